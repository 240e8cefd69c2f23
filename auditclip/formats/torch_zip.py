"""Where the bytes of a zip-format torch file lie, and how to keep its checksums true after patching them.

``torch.save`` writes a zip archive whose tensors are *stored* (uncompressed) records
``archive/data/<key>``, one per storage. Clipping such a file in place (Lightning
``.ckpt`` with foreign objects, DeepSpeed's model and optimizer states) overwrites
bytes inside those records and must then rewrite each changed record's CRC-32, which
the archive keeps in up to three places: the central directory entry, the local
header and the data descriptor (torch's writer sets flag bit 3). :func:`zip_records`
finds them; :func:`fix_crcs` recomputes the CRC of patched records in an output file,
streaming, so a record is never held whole in memory for it.

>>> import io, tempfile, torch, zipfile
>>> from pathlib import Path
>>> from auditclip.formats.pinned import PinnedFile
>>> path = Path(tempfile.mkdtemp()) / "t.pt"
>>> torch.save({"w": torch.arange(4.0)}, path)
>>> f = PinnedFile(path)
>>> [r.size for r in zip_records(f).values() if r.name.endswith("data/0")]
[16]
>>> f.close()
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections.abc import Iterable
from typing import Any, BinaryIO, NamedTuple

from auditclip.errors import CheckpointError

__all__ = ["ZipRecord", "fix_crcs", "zip_records"]


class ZipRecord(NamedTuple):
    """One stored (uncompressed) record of a zip file: where its data lies and where its CRC-32 is written."""

    name: str
    data: int  # offset of the first data byte
    size: int
    crc: int
    crc_at: tuple[int, ...]  # central directory entry, local header, data descriptor (where they hold it)


def zip_records(f: Any) -> dict[int, ZipRecord]:
    """The stored records of a zip-format torch file (a ``PinnedFile``), by the offset of their data.

    The central directory is walked here (zipfile does not say where each entry lies)
    to find the CRC field of every record; its local header and data descriptor hold
    the CRC too, or zero. Compressed records are left out (torch stores its tensors).
    """
    with f.dup() as fh, zipfile.ZipFile(fh) as z:
        infos, position = z.infolist(), z.start_dir
    records: dict[int, ZipRecord] = {}
    for info in infos:
        head = f.read(position, 46)
        if head[:4] != b"PK\x01\x02":
            raise CheckpointError(f.path, "zip central directory is not where the file says")
        n, m, k = struct.unpack("<HHH", head[28:34])
        crc_at = [position + 16]
        position += 46 + n + m + k
        if info.compress_type != zipfile.ZIP_STORED:
            continue
        local = f.read(info.header_offset, 30)
        if local[:4] != b"PK\x03\x04":
            raise CheckpointError(f.path, f"zip record {info.filename} has no local header")
        data = info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30]))
        if struct.unpack("<I", local[14:18])[0] == info.CRC:
            crc_at.append(info.header_offset + 14)
        end = data + info.compress_size
        if info.flag_bits & 0x08 and end + 8 <= f.size:
            descriptor = f.read(end, 8)
            at = end + 4 if descriptor[:4] == b"PK\x07\x08" else end
            if struct.unpack("<I", f.read(at, 4))[0] == info.CRC:
                crc_at.append(at)
        records[data] = ZipRecord(info.filename, data, info.file_size, info.CRC, tuple(crc_at))
    return records


def fix_crcs(out: BinaryIO, records: Iterable[ZipRecord], block: int = 1 << 22) -> None:
    """Recompute the CRC-32 of each record from the bytes ``out`` (opened ``r+b``) now holds, and write it.

    Read in blocks of ``block`` bytes: memory stays bounded whatever the record's size.

    >>> import io, zlib
    >>> buf = io.BytesIO(b"\\0\\0\\0\\0abc")
    >>> fix_crcs(buf, [ZipRecord("r", 4, 3, 0, (0,))])
    >>> buf.getvalue()[:4] == zlib.crc32(b"abc").to_bytes(4, "little")
    True
    """
    for record in records:
        crc, pos, end = 0, record.data, record.data + record.size
        while pos < end:
            out.seek(pos)
            chunk = out.read(min(block, end - pos))
            if not chunk:
                raise OSError(f"zip record {record.name} ends beyond the file")
            crc = zlib.crc32(chunk, crc)
            pos += len(chunk)
        packed = struct.pack("<I", crc)
        for at in record.crc_at:
            out.seek(at)
            out.write(packed)
    out.flush()
