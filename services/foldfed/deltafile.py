"""Tensors to and from a delta's payload file: the one place torch meets the format.

We write the file ourselves instead of calling `safetensors.torch.save_file`, for two
reasons that matter to content addressing: the library writes `__metadata__` in hash-map
order (a different order, hence different bytes and different chunk digests, on every
run), and it needs a byte copy of each tensor. Our writer takes the canonical header from
foldfed.format, emits the same bytes for the same tensors every time, streams tensor
memory straight to disk, and `safetensors` still reads the result (`load_delta` uses it,
and the tests check it). Reading a payload without torch (layout, chunks) is
foldfed.payloadfile.

torch is imported only inside the functions that need tensors, so importing this module
costs nothing; the hub never imports it at all (an import-linter contract in
pyproject.toml forbids it).

Everything here blocks (disk): async callers run it in a worker thread.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from foldfed.durable import fsync_dir
from foldfed.errors import CodecError
from foldfed.format import METADATA_KEY, TensorSpec, canonical_order, encode_header

if TYPE_CHECKING:
    import torch


@functools.cache
def _torch_dtypes() -> Mapping[str, torch.dtype]:
    import torch

    return {
        "F64": torch.float64,
        "I64": torch.int64,
        "F32": torch.float32,
        "I32": torch.int32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }


@functools.cache
def _dtype_names() -> Mapping[torch.dtype, str]:
    return {v: k for k, v in _torch_dtypes().items()}


def __getattr__(name: str) -> object:
    # TORCH_DTYPES (safetensors dtype string -> torch.dtype) loads torch on first use.
    if name == "TORCH_DTYPES":
        return _torch_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_delta(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the payload at `path`, read by the safetensors library."""
    import safetensors.torch

    return safetensors.torch.load_file(str(path))


def write_delta(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `tensors` as a canonical payload at `path`, atomically (fsynced, renamed).

    The same tensors and metadata give the same bytes on every run and machine.
    """
    if sys.byteorder != "little":
        raise CodecError("writing deltas needs a little-endian host")
    dense = _dense_tensors(tensors)
    specs = {name: _spec_of(name, tensor) for name, tensor in dense.items()}
    header = encode_header(specs.values(), metadata)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            for spec in canonical_order(specs.values()):
                f.write(_as_bytes(dense[spec.name]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _dense_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor as a contiguous CPU tensor of a dtype the format knows."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name == METADATA_KEY:
            raise CodecError(f"invalid tensor name {name!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise CodecError(f"tensor {name!r}: not a dense torch.Tensor")
        if tensor.dtype not in _dtype_names():
            raise CodecError(f"tensor {name!r}: dtype {tensor.dtype} is not supported")
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def _spec_of(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, _dtype_names()[tensor.dtype], tuple(tensor.shape))


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    # A flat uint8 view of the tensor's own memory: no copy, whatever the dtype (bf16 too).
    import torch

    flat = tensor.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")
