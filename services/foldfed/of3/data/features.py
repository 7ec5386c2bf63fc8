"""The feature file: one OpenFold3 training example, unbatched, in one safetensors file.

Every tensor is stored under its path in the nested feature dict
(`ground_truth/atom_positions`); everything else — the format version, the nesting, the
all-zero tensors (declared by shape and dtype instead of stored: the empty template
features), the entry's description (`example.FeatureInfo`) — is JSON in the safetensors
header metadata under the key "foldfed". `load_batch` reads a file back and collates it
with `openfold_batch_collator` into a batch of one. No pickle anywhere. The byte layout
and its rules are in docs/of3_data.md; the file's name is `cachekey.cache_key`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foldfed.errors import CodecError
from foldfed.of3.data.example import FeatureInfo, Featurized

if TYPE_CHECKING:
    import torch

FORMAT = "foldfed.of3.features/1"
METADATA_KEY = "foldfed"
SUFFIX = ".safetensors"

# Nested feature dicts and the type of their keys ("str", or "int" for the ligand
# permutation table, keyed by reference-space uid).
_NESTED_KEY_TYPES = {"ground_truth": "str", "loss_weights": "str", "ref_space_uid_to_perm": "int"}

# Tensors of at least this many elements that are all zero (e.g. the template features
# when there are no templates) are declared in the header instead of stored.
_MIN_ZEROS_NUMEL = 1024
_MAX_ZEROS_NUMEL = 1 << 31
_ZERO_DTYPES = frozenset(
    {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8"}
    | {"bool"}
)


def _flatten(features: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    import torch

    tensors: dict[str, torch.Tensor] = {}
    nested: dict[str, str] = {}
    for name, value in features.items():
        if "/" in name:
            raise CodecError(f"feature name {name!r} contains '/'")
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().contiguous().clone()
        elif isinstance(value, Mapping):
            key_type = _NESTED_KEY_TYPES.get(name)
            if key_type is None:
                raise CodecError(f"feature {name!r} is a dict foldfed does not know")
            nested[name] = key_type
            for sub, tensor in value.items():
                if not isinstance(tensor, torch.Tensor):
                    raise CodecError(f"feature {name}/{sub} is {type(tensor).__name__}")
                tensors[f"{name}/{sub}"] = tensor.detach().contiguous().clone()
        else:
            raise CodecError(f"feature {name!r} is {type(value).__name__}, not a tensor")
    return tensors, nested


def encode_feature_file(featurized: Featurized) -> bytes:
    """The bytes of a feature file (safetensors; JSON description in its header)."""
    from safetensors.torch import save

    tensors, nested = _flatten(featurized.features)
    zeros = {
        name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for name, t in tensors.items()
        if t.numel() >= _MIN_ZEROS_NUMEL and not bool(t.any())
    }
    stored = {name: t for name, t in tensors.items() if name not in zeros}
    header = {
        "format": FORMAT,
        "nested": nested,
        "zeros": zeros,
        "info": featurized.info.as_json(),
    }
    return save(stored, metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})


def _zeros(path: Path, spec: Any) -> dict[str, torch.Tensor]:
    """The all-zero tensors a header declares (validated: names, dtypes, sizes)."""
    import torch

    if not isinstance(spec, dict):
        raise CodecError(f"{path}: 'zeros' is not an object")
    out = {}
    for name, value in spec.items():
        try:
            shape = [int(d) for d in value["shape"]]
            dtype = str(value["dtype"])
            if dtype not in _ZERO_DTYPES:
                raise ValueError(f"dtype {dtype!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"{path}: zero tensor {name!r}: bad spec {value!r}") from exc
        numel = 1
        for d in shape:
            if d < 0:
                raise CodecError(f"{path}: zero tensor {name!r}: negative dimension")
            numel *= d
        if numel > _MAX_ZEROS_NUMEL:
            raise CodecError(f"{path}: zero tensor {name!r}: {numel} elements is too many")
        out[str(name)] = torch.zeros(shape, dtype=getattr(torch, dtype))
    return out


def write_feature_file(path: Path, featurized: Featurized) -> None:
    """Write atomically and durably (a reader never sees half a file)."""
    from foldfed.durable import atomic_write

    atomic_write(path, encode_feature_file(featurized))


def _read_header(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise CodecError(f"{path}: not a safetensors feature file ({exc})") from exc
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise CodecError(f"{path}: no {METADATA_KEY!r} metadata: not a foldfed feature file")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CodecError(f"{path}: feature metadata is not JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise CodecError(f"{path}: feature format {found!r}, this reader knows {FORMAT!r}")
    return header


def read_feature_info(path: Path) -> FeatureInfo:
    """The description stored in a feature file's header (no tensors are read)."""
    return FeatureInfo.from_json(_read_header(Path(path))["info"])


def load_features(path: Path) -> dict[str, Any]:
    """One cached example as OpenFold3's unbatched feature dict (fresh tensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    header = _read_header(path)
    nested: dict[str, str] = header.get("nested", {})
    if any(_NESTED_KEY_TYPES.get(k) != v for k, v in nested.items()):
        raise CodecError(f"{path}: unknown nesting {nested}")
    try:
        flat = load_file(str(path))
    except Exception as exc:
        raise CodecError(f"{path}: tensors unreadable ({exc})") from exc
    zeros = _zeros(path, header.get("zeros", {}))
    if set(zeros) & set(flat):
        raise CodecError(f"{path}: tensors {sorted(set(zeros) & set(flat))} stored twice")
    flat.update(zeros)
    features: dict[str, Any] = {name: {} for name in nested}
    for name, tensor in flat.items():
        top, sep, sub = name.partition("/")
        if not sep:
            features[name] = tensor
            continue
        if top not in nested:
            raise CodecError(f"{path}: tensor {name!r} is under an undeclared dict")
        if nested[top] == "int":
            try:
                features[top][int(sub)] = tensor
            except ValueError as exc:
                raise CodecError(f"{path}: tensor {name!r}: key is not an integer") from exc
        else:
            features[top][sub] = tensor
    if "ref_space_uid_to_perm" in features:
        features["ref_space_uid_to_perm"] = dict(sorted(features["ref_space_uid_to_perm"].items()))
    missing = [k for k in ("ground_truth", "loss_weights", "token_mask") if k not in features]
    if missing:
        raise CodecError(f"{path}: missing features {missing}")
    return features


def load_batch(path: Path) -> dict[str, Any]:
    """One cached example → a fresh collated batch of one, exactly what `OpenFold3.forward`
    and `OpenFold3Loss(...)(batch, outputs, _return_breakdown=True)` take in training mode,
    ground truth included. Every call returns new tensors (the model edits the batch in
    place)."""
    from openfold3.core.data.framework.data_module import openfold_batch_collator

    return openfold_batch_collator([load_features(path)])
