"""The one dtype table: safetensors codes, torch dtypes, and which ones auditclip analyses.

safetensors names dtypes by code (``F32``, ``BF16``, ``F8_E4M3``...); torch by
attribute name (``float32``...). Codes torch cannot hold as a plain element
type (``F4``/``F6`` sub-byte floats) are kept as their lower-case code: such a
tensor is listed with its dtype and shape but never read or clipped.
"""

from __future__ import annotations

import torch

#: safetensors code -> (torch dtype name, bits per element)
SAFETENSORS: dict[str, tuple[str, int]] = {
    "F64": ("float64", 64), "F32": ("float32", 32), "F16": ("float16", 16), "BF16": ("bfloat16", 16),
    "F8_E4M3": ("float8_e4m3fn", 8), "F8_E5M2": ("float8_e5m2", 8), "F8_E8M0": ("float8_e8m0fnu", 8),
    "I64": ("int64", 64), "I32": ("int32", 32), "I16": ("int16", 16), "I8": ("int8", 8),
    "U64": ("uint64", 64), "U32": ("uint32", 32), "U16": ("uint16", 16), "U8": ("uint8", 8),
    "BOOL": ("bool", 8), "C64": ("complex64", 64),
    # sub-byte floats: packed, no torch element type; listed, never read
    "F4": ("f4", 4), "F6_E2M3": ("f6_e2m3", 6), "F6_E3M2": ("f6_e3m2", 6),
}
CODE_OF: dict[str, str] = {name: code for code, (name, _) in SAFETENSORS.items()}

#: Floating dtypes whose values auditclip measures and clips (widened exactly to float32/64).
ANALYSED = frozenset({
    "float64", "float32", "float16", "bfloat16",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
})


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``.

    >>> dtype_name(torch.bfloat16)
    'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a name from :data:`SAFETENSORS` or :func:`dtype_name`, or None.

    >>> torch_dtype("bfloat16"), torch_dtype("f4")
    (torch.bfloat16, None)
    """
    dtype = getattr(torch, name, None) if name.isidentifier() else None
    return dtype if isinstance(dtype, torch.dtype) else None


def is_float_dtype(name: str) -> bool:
    """True for the floating dtypes auditclip analyses (fp64/32/16, bf16, fp8).

    >>> is_float_dtype("bfloat16"), is_float_dtype("int64"), is_float_dtype("float4_e2m1fn_x2")
    (True, False, False)
    """
    return name in ANALYSED and torch_dtype(name) is not None


def safetensors_code(dtype: torch.dtype) -> str:
    """The safetensors code a torch dtype is written under.

    >>> safetensors_code(torch.float8_e4m3fn)
    'F8_E4M3'
    """
    name = dtype_name(dtype)
    if name not in CODE_OF:
        from ..errors import InputError

        raise InputError(f"safetensors cannot hold dtype {name}")
    return CODE_OF[name]
