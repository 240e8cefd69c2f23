"""Remote runs through fsspec: ``s3://``, ``gs://``, ``az://``, ``hf://``, ``http(s)://``... read lazily.

A run named by URL is listed once (:func:`local_view`) into a local *view*: a temporary
folder with the run's tree, its small metadata files (JSON, ``latest``, DCP ``.metadata``)
copied, and every weight file a sparse placeholder of the right size and modification time.
Discovery, globbing and step order then work on the view exactly as on a local run,
and every byte of a weight file is read from the remote object, never from its placeholder:
:class:`~auditclip.formats.pinned.PinnedFile` (and :func:`open_binary`, for code that wants
a file object) open a placeholder as a :class:`RemoteFile`, which reads with ranged requests
(``fs.cat_file(path, start, end)``):

* a read is split into blocks of :data:`BLOCK_BYTES` fetched by a shared pool of
  ``--io-workers`` threads straight into the caller's buffer, so memory stays bounded and
  at most that many ranged requests are in flight in the whole process;
* the first and last :data:`EDGE_BYTES` of a file are fetched once and kept: a safetensors
  header (bytes 0..8, then the JSON) costs one request, a zip's central directory one more;
* a transient error (connection reset, throttling, 5xx) is retried :data:`RETRIES` times
  with exponential backoff; a missing object or refused credentials fail at once;
* the object's size and ETag (or generation, or modification time) are compared with the
  ones it had when opened, at most every :data:`CHECK_SECONDS` while reading and whenever
  asked: an object replaced while it is read is a ``changed`` error, as for a local file.

Credentials come from each filesystem's usual environment and configuration (``AWS_*``
variables or ``~/.aws`` for s3fs, ``gcloud`` application credentials for gcsfs...); fsspec's
own ``FSSPEC_<PROTOCOL>_<OPTION>`` variables (``FSSPEC_S3_ENDPOINT_URL``) reach the filesystem.

Outputs (:func:`remote_output`) are written to a local staging folder and published file
by file under a temporary key, then copied to the final key (server-side for object
stores) and the temporary key removed: an interrupted command leaves no object under a
final name.

>>> import fsspec, torch
>>> from safetensors.torch import save
>>> fsspec.filesystem("memory").pipe("/doc/run/step_1.safetensors", save({"w": torch.arange(4.0)}))
>>> view = local_view("memory://doc/run")
>>> sorted(p.name for p in view.iterdir())
['step_1.safetensors']
>>> from auditclip.formats.readers import open_checkpoint_file
>>> with open_checkpoint_file(view / "step_1.safetensors") as r:
...     r.get("w").tolist()
[0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..errors import SHOWN_PATHS, CheckpointError, InputError, shown_path
from ..notices import note

__all__ = ["BLOCK_BYTES", "CHECK_SECONDS", "EDGE_BYTES", "MARKER", "RETRIES", "RemoteFile", "VIEW_PREFIX", "is_url",
           "local_view",
           "open_binary", "remote_file", "remote_output", "set_io_workers", "url_filesystem"]

#: Bytes of one ranged request: a larger read is split into blocks fetched in parallel.
BLOCK_BYTES = 8 << 20
#: The first and last bytes of a file kept after one request (headers, zip directories).
EDGE_BYTES = 64 << 10
#: Tries of a ranged request after a transient error, with backoff doubling from BACKOFF_SECONDS.
RETRIES = 5
BACKOFF_SECONDS = 0.2
#: Longest time between two checks that the object is still the one opened.
CHECK_SECONDS = 2.0
#: Ranged requests in flight at once, in the whole process (``--io-workers``).
DEFAULT_IO_WORKERS = 8
#: Files copied into the local view whole (metadata); weight files and anything larger are placeholders.
COPY_BYTES = 64 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".distcp")
#: The local views' folders begin with this; each holds a MARKER naming its URL and placeholders.
VIEW_PREFIX = "auditclip-remote-"
MARKER = ".auditclip-view.json"
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_GLOB = re.compile(r"[*?\[]")
#: object fields that change when an object is replaced, by filesystem (s3, gcs, azure, http, local...)
_STAMP_KEYS = ("ETag", "etag", "generation", "md5Hash", "VersionId", "version_id", "LastModified",
               "last_modified", "updated", "mtime", "created")

_T = TypeVar("_T")
_lock = threading.Lock()
_io_workers = DEFAULT_IO_WORKERS
_pool: ThreadPoolExecutor | None = None
_slots = threading.BoundedSemaphore(DEFAULT_IO_WORKERS)
#: placeholder path in a view -> (filesystem, remote path, size listed)
_placeholders: dict[str, tuple[Any, str, int]] = {}


def is_url(text: object) -> bool:
    """Whether ``text`` names a remote location (``scheme://``; ``file://`` is local).

    >>> is_url("s3://bucket/run/"), is_url("runs/high_lr"), is_url("file:///tmp/x")
    (True, False, False)
    """
    m = _URL.match(str(text)) if isinstance(text, str) else None
    return m is not None and m.group(1).lower() not in ("file", "local")


def set_io_workers(n: int) -> None:
    """Bound the ranged requests in flight at once in this process (``--io-workers``).

    >>> set_io_workers(4); set_io_workers(DEFAULT_IO_WORKERS)
    """
    global _io_workers, _pool, _slots
    if n < 1:
        raise InputError(f"--io-workers {n}: give at least 1")
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _io_workers, _pool, _slots = n, None, threading.BoundedSemaphore(n)


def _workers() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_io_workers, thread_name_prefix="auditclip-io")
        return _pool


def _transient(exc: BaseException) -> bool:
    """A failure worth retrying: not a missing object, refused access or a bad request."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        NotImplementedError, ValueError, TypeError, KeyError)):
        return False
    return isinstance(exc, Exception)


def _retry(what: Callable[[], _T], path: object) -> _T:
    """``what()``, retried with exponential backoff while it fails with a transient error."""
    for attempt in range(RETRIES):
        try:
            return what()
        except Exception as exc:
            if not _transient(exc):
                raise
            if attempt == RETRIES - 1:
                raise CheckpointError(path, f"remote read failed {RETRIES} times: "
                                            f"{' '.join(str(exc).split()) or type(exc).__name__}") from exc
            time.sleep(BACKOFF_SECONDS * 2 ** attempt)
    raise AssertionError("unreachable")


def _stamp(info: dict[str, Any]) -> tuple[Any, ...]:
    return (int(info.get("size") or 0),) + tuple(str(info[k]) for k in _STAMP_KEYS if info.get(k) is not None)


class RemoteFile:
    """A remote object read with ranged requests: :class:`~auditclip.formats.pinned.PinnedFile`'s interface.

    ``path`` is the placeholder in the local view (what messages name; errors show the URL).
    """

    def __init__(self, fs: Any, rpath: str, path: Path, listed_size: int | None = None) -> None:
        self.fs, self.rpath, self.path = fs, rpath, path
        self._stamp = self._info_stamp()
        self.size = self._stamp[0]
        if listed_size is not None and self.size != listed_size:
            raise CheckpointError(path, f"changed since the run was listed (it was {listed_size} bytes, now "
                                        f"{self.size}): a trainer is probably still writing it", kind="changed")
        self._checked = time.monotonic()
        self._edges: dict[int, bytes] = {}
        self._edge_lock = threading.Lock()
        self.closed = False

    def _info_stamp(self) -> tuple[Any, ...]:
        def info() -> dict[str, Any]:
            self.fs.invalidate_cache(self.rpath)  # a listing's cached entry would hide a replaced object
            return self.fs.info(self.rpath)
        try:
            return _stamp(_retry(info, self.path))
        except FileNotFoundError:
            raise CheckpointError(self.path, "no such object (deleted since the run was listed?)") from None
        except PermissionError as exc:
            raise CheckpointError(self.path, f"access refused: {exc}") from None

    @property
    def stamp(self) -> tuple[Any, ...]:
        """(size, ETag/generation/time...) when opened: what an index records to notice a change since."""
        return self._stamp

    def check(self) -> None:
        """Raise ``changed`` if the object is not the one opened (size or ETag/generation/time differ)."""
        now = self._info_stamp()
        self._checked = time.monotonic()
        if now != self._stamp:
            raise CheckpointError(
                self.path, f"changed while being read (it was {self._stamp[0]} bytes, now {now[0]}, replaced "
                           "since it was opened): a trainer is probably still writing it; audit it once it is "
                           "complete", kind="changed")

    def _fetch(self, start: int, end: int) -> bytes:
        def get() -> bytes:
            with _slots:
                return self.fs.cat_file(self.rpath, start=start, end=end)
        data = _retry(get, self.path)
        if len(data) != end - start:
            self.check()
            raise CheckpointError(self.path, f"ranged read of bytes {start}..{end} gave {len(data)} bytes",
                                  kind="changed")
        return data

    def _edge(self, offset: int, size: int) -> bytes | None:
        """The bytes from the kept first or last EDGE_BYTES of the file, if the read lies inside one."""
        for begin in (0, max(0, self.size - EDGE_BYTES)):
            end = min(self.size, begin + EDGE_BYTES)
            if begin <= offset and offset + size <= end:
                with self._edge_lock:
                    if begin not in self._edges:
                        self._edges[begin] = self._fetch(begin, end)
                    return self._edges[begin][offset - begin:offset - begin + size]
        return None

    def read_into(self, buffer: Any, offset: int) -> None:
        """Fill the writable ``buffer`` from ``offset``: blocks fetched in parallel, each into its place."""
        view = memoryview(buffer).cast("B")
        size = len(view)
        if offset < 0 or offset + size > self.size:
            raise CheckpointError(self.path, f"data at bytes {offset}..{offset + size} lies beyond the end "
                                             f"of the file ({self.size} bytes)")
        if size == 0:
            return
        kept = self._edge(offset, size)
        if kept is not None:
            view[:] = kept
            return
        spans = [(s, min(size, s + BLOCK_BYTES)) for s in range(0, size, BLOCK_BYTES)]

        def fill(span: tuple[int, int]) -> None:
            view[span[0]:span[1]] = self._fetch(offset + span[0], offset + span[1])

        if len(spans) == 1:
            fill(spans[0])
        else:
            for future in [_workers().submit(fill, span) for span in spans]:
                future.result()
        if time.monotonic() - self._checked > CHECK_SECONDS:
            self.check()

    def read(self, offset: int, size: int) -> bytes:
        buffer = bytearray(size)
        self.read_into(buffer, offset)
        return bytes(buffer)

    def dup(self) -> io.BufferedReader:
        """A read-only file object over ranged reads (for zipfile and ``torch.load``)."""
        return io.BufferedReader(_RawRemote(self), buffer_size=EDGE_BYTES)

    def close(self) -> None:
        self.closed = True


class _RawRemote(io.RawIOBase):
    def __init__(self, f: RemoteFile) -> None:
        self._f, self._pos = f, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._f.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(memoryview(b).cast("B")), self._f.size - self._pos))
        if n:
            self._f.read_into(memoryview(b).cast("B")[:n], self._pos)
            self._pos += n
        return n


def remote_file(path: str | os.PathLike[str]) -> RemoteFile | None:
    """The remote object a placeholder of a local view stands for, opened; None for any other path."""
    text = os.fspath(path)
    if not _placeholders and VIEW_PREFIX not in text:
        return None
    found = _placeholders.get(os.path.abspath(text)) or _placeholders.get(os.path.realpath(text))
    if found is None and VIEW_PREFIX in text:
        found = _from_marker(Path(os.path.abspath(text)))
    if found is None:
        return None
    fs, rpath, size = found
    return RemoteFile(fs, rpath, Path(path), size)


def _from_marker(path: Path) -> tuple[Any, str, int] | None:
    """A placeholder of a view listed by another process (a worker handed a checkpoint's path):
    its object found through the view's marker file, never read as the zeros it holds."""
    top = next((p for p in path.parents if p.name.startswith(VIEW_PREFIX)), None)
    if top is None or not (top / MARKER).is_file():
        return None
    doc = json.loads((top / MARKER).read_text(encoding="utf-8"))
    rel = path.relative_to(top).as_posix()
    if rel not in doc["placeholders"]:
        return None
    fs, _ = _filesystem(doc["url"])
    entry = (fs, doc["placeholders"][rel], os.stat(path).st_size)
    _placeholders[os.path.abspath(path)] = entry
    return entry


def open_binary(path: str | os.PathLike[str]) -> Any:
    """A binary file object on ``path``: the local file, or ranged reads of the object its placeholder stands for.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "a"; _ = p.write_bytes(b"xy")
    >>> with open_binary(p) as f: f.read()
    b'xy'
    """
    remote = remote_file(path)
    return open(path, "rb") if remote is None else remote.dup()


def url_filesystem(url: str) -> Any:
    """The fsspec filesystem that reads ``url`` (fsspec caches one per protocol and options).

    >>> type(url_filesystem("memory://x")).__name__
    'MemoryFileSystem'
    """
    return _filesystem(url)[0]


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError as exc:  # a dependency; an environment without it cannot read URLs
        raise InputError(f"{url}: reading URLs needs fsspec (pip install fsspec)") from exc
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        scheme = url.split("://", 1)[0]
        extra = {"s3": " (pip install 'auditclip[s3]')", "gs": " (pip install 'auditclip[gcs]')",
                 "gcs": " (pip install 'auditclip[gcs]')", "az": " (pip install adlfs)", "abfs": " (pip install adlfs)"}
        raise InputError(f"{url}: cannot open {scheme}:// URLs: {' '.join(str(exc).split())}"
                         f"{extra.get(scheme, '')}") from exc


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("LastModified", "last_modified", "updated", "mtime", "created"):
        value = info.get(key)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        if isinstance(value, (int, float)):
            return float(value)
    return None


def local_view(url: str) -> Path:
    """List the run at ``url`` and return its local view (see the module docstring), listed anew at
    each call so checkpoints written since are seen; a glob
    (``s3://bucket/run/*.safetensors``) gives the view's path with the same pattern.

    Example: the module docstring.
    """
    text = url.rstrip("/") if not _GLOB.search(url) else url
    base, pattern = text, ""
    if _GLOB.search(text):  # list the fixed part; the existing local glob matches the rest
        parts = text.split("/")
        fixed = next(i for i, p in enumerate(parts) if _GLOB.search(p))
        base, pattern = "/".join(parts[:fixed]), "/".join(parts[fixed:])
    fs, root = _filesystem(base)
    root = root.rstrip("/") or root
    try:
        fs.invalidate_cache()
        info = _retry(lambda: fs.info(root), base)
    except FileNotFoundError:
        raise InputError(f"no such file or directory: {url}") from None
    except (PermissionError, CheckpointError) as exc:
        raise InputError(f"{url}: cannot be listed: {exc}") from None
    if info.get("type") == "directory":
        listed = _retry(lambda: fs.find(root, withdirs=True, detail=True), base)
    else:
        listed = {root: info}
    # resolved: discovery resolves paths, and a placeholder must be found under either spelling
    top = Path(tempfile.mkdtemp(prefix=VIEW_PREFIX)).resolve()
    _cleanup_at_exit(top)
    name = root.rstrip("/").rsplit("/", 1)[-1] or "run"
    view = top / name
    SHOWN_PATHS[str(view)] = fs.unstrip_protocol(root) if hasattr(fs, "unstrip_protocol") else base
    small: dict[str, Path] = {}
    marked: dict[str, str] = {}  # placeholder, relative to the view's folder -> remote path
    for rpath, entry in sorted(listed.items()):
        if info.get("type") == "directory" and not rpath.startswith(root + "/"):
            continue  # not below the folder named (a listing by prefix: run2/ beside run/)
        rel = rpath[len(root):].lstrip("/") if info.get("type") == "directory" else ""
        if any(part in ("", ".", "..") for part in rel.split("/")) and rel:
            # a key such as run/../x or run//x would land outside the view, or on another name: never mirrored
            note(f"{shown_path(view)}: left out the object {rpath!r}: its key is not a plain relative path")
            continue
        local = view / rel if rel else view
        if entry.get("type") == "directory":
            local.mkdir(parents=True, exist_ok=True)
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        size = int(entry.get("size") or 0)
        if size <= COPY_BYTES and not rpath.lower().endswith(_WEIGHT_SUFFIXES):
            small[rpath] = local
        else:
            with open(local, "wb") as f:
                f.truncate(size)  # sparse: takes no disk
            _placeholders[os.path.abspath(local)] = (fs, rpath, size)
            marked[local.relative_to(top).as_posix()] = rpath
        mtime = _mtime(entry)
        if mtime is not None and rpath not in small:
            os.utime(local, (mtime, mtime))
    names = list(small)
    for i in range(0, len(names), 32):  # fetched 32 at a time: memory bounded by 32 files, not the run
        batch = names[i:i + 32]
        got = _retry(lambda batch=batch: fs.cat(batch, on_error="return"), base)
        for rpath in batch:
            local = small[rpath]
            data = got.get(rpath)
            if not isinstance(data, bytes):
                raise InputError(f"{url}: cannot read {rpath}: {data}")
            local.write_bytes(data)
            mtime = _mtime(listed[rpath])
            if mtime is not None:
                os.utime(local, (mtime, mtime))
    (top / MARKER).write_text(json.dumps({"url": base, "placeholders": marked}), encoding="utf-8")
    return Path(f"{view}/{pattern}") if pattern else view


def _cleanup_at_exit(folder: Path) -> None:
    import atexit

    atexit.register(shutil.rmtree, folder, True)


@contextmanager
def remote_output(out: str, *, force: bool = False) -> Iterator[Path]:
    """A local staging folder for outputs bound for the URL ``out``, published when the block succeeds.

    Each file goes to ``KEY.auditclip-partial-<id>`` first, then is copied to ``KEY`` (a
    server-side copy on object stores) and the temporary key removed; shard indexes,
    DCP ``.metadata``, DeepSpeed's ``latest`` and reports go last, so a reader never sees an
    index naming a shard not yet there. Nothing is published when the block raises (Ctrl-C
    included); an existing object under ``out`` is refused unless ``force``.

    >>> import fsspec
    >>> with remote_output("memory://doc/out") as staging:
    ...     _ = (staging / "a.txt").write_text("hi")
    >>> fsspec.filesystem("memory").cat_file("/doc/out/a.txt")
    b'hi'
    """
    fs, root = _filesystem(out)
    root = root.rstrip("/")
    fs.invalidate_cache()
    existing = [p for p in (_retry(lambda: fs.find(root), out) if fs.exists(root) else [])]
    if existing and not force:
        raise InputError(f"--out {out} already holds {len(existing)} object(s) (e.g. "
                         f"{existing[0][len(root):].lstrip('/')}); pass --force to overwrite them")
    staging = Path(tempfile.mkdtemp(prefix="auditclip-out-"))
    try:
        yield staging
        files = [p for p in staging.rglob("*") if p.is_file()]
        files.sort(key=lambda p: (p.name.endswith((".index.json", ".metadata", ".csv", ".md", ".html"))
                                  or p.name == "latest", p.as_posix()))
        for local in files:
            _publish(fs, local, f"{root}/{local.relative_to(staging).as_posix()}")
        stale = f"{root}/errors.csv"  # a list from an earlier run (--force) would mislead, as locally
        if stale in existing and not (staging / "errors.csv").exists():
            _retry(lambda: fs.rm_file(stale), out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(fs: Any, local: Path, key: str) -> None:
    """Upload ``local`` under a temporary key, then copy it to ``key``; the temporary key never stays."""
    tmp = f"{key}.auditclip-partial-{uuid.uuid4().hex[:12]}"
    try:
        _retry(lambda: fs.put_file(str(local), tmp), key)
        _retry(lambda: fs.copy(tmp, key), key)
    finally:
        try:
            fs.rm_file(tmp)
        except Exception:  # already gone, or never written; nothing under the final key either way
            pass
