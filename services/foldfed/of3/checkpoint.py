"""Start from a local checkpoint file: the public OpenFold3 weights when a user has them.

Never downloads anything, and never unpickles arbitrary objects: a `.safetensors` file is
read with safetensors; anything else goes through `torch.load(weights_only=True)`, which
only rebuilds tensors and plain containers (a checkpoint that pickles other objects, such
as a Lightning checkpoint's hyper-parameters, is refused with a reason: export its state dict as
safetensors on a trusted machine).

Formats understood, as OpenFold3's `get_state_dict_from_checkpoint` does: a bare state
dict (the released weights), a Lightning checkpoint (`state_dict` with a `model.` prefix,
plus `ema`), a DeepSpeed one (`module`). When EMA weights are present they are used, as
OpenFold3's own inference does (`init_from_ema_weights=True`).

Loading checks every name: a model tensor the checkpoint lacks, a checkpoint tensor the
model lacks, or a shape that differs is an error that names the tensor. OpenFold3 reaches
the diffusion module under two names (`diffusion_module.*` and
`sample_diffusion.diffusion_module.*`); either name satisfies both.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foldfed.errors import ConfigError, FoldfedError

if TYPE_CHECKING:
    import torch

_MAX_LISTED = 5


class CheckpointError(FoldfedError):
    """A checkpoint file that cannot be used, and why."""


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint file, by state-dict name (no `model.` prefix)."""
    import torch

    if not path.is_file():
        raise ConfigError(f"FOLDFED_OF3_CHECKPOINT: {path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: it stores objects other than tensors and plain containers "
            f"({str(exc).splitlines()[0]}); export its state dict as safetensors instead"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {exc}") from None
    return _state_dict_of(raw, path)


def _state_dict_of(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of tensors, got {type(raw).__name__}")
    ema = raw.get("ema")
    if isinstance(ema, Mapping) and isinstance(ema.get("params"), Mapping) and ema["params"]:
        tensors: Mapping[str, Any] = ema["params"]
    elif isinstance(raw.get("state_dict"), Mapping):
        tensors = {k.removeprefix("model."): v for k, v in raw["state_dict"].items()}
    elif isinstance(raw.get("module"), Mapping):
        tensors = {k.removeprefix("model."): v for k, v in raw["module"].items()}
    else:
        tensors = raw
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is not a named tensor")
        out[name] = value
    return out


def load_into(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into `model`'s parameters and buffers, checking names and shapes."""
    import torch

    state = model.state_dict(keep_vars=True)
    aliases = _alias_groups(state)
    unexpected = sorted(set(tensors) - set(state))
    if unexpected:
        raise CheckpointError(f"{source}: tensors the model does not have: {_list(unexpected)}")
    missing = sorted(name for name in state if not any(alias in tensors for alias in aliases[name]))
    if missing:
        raise CheckpointError(f"{source}: model tensors missing from it: {_list(missing)}")
    for name, target in state.items():
        given = tensors.get(name)
        if given is None:
            continue
        if tuple(given.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{source}: {name!r} has shape {list(given.shape)}, "
                f"the model wants {list(target.shape)}"
            )
        if not (given.is_floating_point() or given.dtype == target.dtype):
            raise CheckpointError(f"{source}: {name!r} has dtype {given.dtype}")
    with torch.no_grad():
        for name, target in state.items():
            given = tensors.get(name)
            if given is not None:
                target.copy_(given.to(target.dtype))


def _alias_groups(state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Every state name -> the names that share its storage (itself included)."""
    by_storage: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        by_storage.setdefault(key, []).append(name)
    out: dict[str, list[str]] = {}
    for names in by_storage.values():
        for name in names:
            out[name] = names
    return out


def _list(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")
