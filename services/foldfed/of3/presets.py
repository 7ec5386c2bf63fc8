"""OpenFold3 model configs from OpenFold3's own presets, plus named sizes and overrides.

A config is OpenFold3's `train` preset (`OF3ProjectEntry.get_model_config_with_presets`),
then a size preset, then the caller's overrides, all as dotted paths into the ConfigDict
(`"architecture.shared.c_s": 64`). Widths are shared FieldReferences upstream, so setting
one path changes every module that uses that width.

Sizes:
- `full`: the published architecture as OpenFold3 defines it, 368,293,788 parameters.
- `tiny`: the same modules at small widths with one block per stack, ~0.8 M parameters,
  CPU seconds per optimizer step. For tests, demos and benchmarks of the plumbing.

Settings every preset gets (they make a round a pure function of its inputs):
`num_recycles = 0` (upstream samples the recycle count at random in training), Triton
kernels off in eval (there is no Triton on CPU), and chunk-size tuning off (it times
kernels, so its choice depends on the machine's load).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from foldfed.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from ml_collections import ConfigDict

MODEL_PREFIX = "openfold3-"
SIZES = ("tiny", "full")

_STACKS = (
    "pairformer",
    "msa.msa_module",
    "template.template_pair_stack",
    "input_embedder.atom_attn_enc",
    "diffusion_module.atom_attn_enc",
    "diffusion_module.diffusion_transformer",
    "diffusion_module.atom_attn_dec",
    "heads.pairformer_embedding.pairformer",
)
_ATOM_ATTENTION = (
    "input_embedder.atom_attn_enc",
    "diffusion_module.atom_attn_enc",
    "diffusion_module.atom_attn_dec",
)
_PAIRFORMERS = ("pairformer", "heads.pairformer_embedding.pairformer")


def _tiny() -> dict[str, Any]:
    a = "architecture."
    out: dict[str, Any] = {
        # Shared widths (FieldReferences: one assignment reaches every module).
        a + "shared.c_s": 64,
        a + "shared.c_z": 32,
        a + "msa.msa_module.c_m": 16,
        a + "template.c_t": 16,
        a + "input_embedder.atom_attn_enc.c_token": 64,  # c_s_input follows (+65)
        a + "diffusion_module.diffusion_module.c_token": 128,
        a + "input_embedder.atom_attn_enc.c_atom": 32,
        a + "input_embedder.atom_attn_enc.c_atom_pair": 8,
        a + "diffusion_module.diffusion_conditioning.c_fourier_emb": 64,
        a + "diffusion_module.diffusion_transformer.no_heads": 4,
        a + "diffusion_module.diffusion_transformer.c_hidden": 32,
        a + "msa.msa_module.c_hidden_mul": 32,
        a + "msa.msa_module.c_hidden_pair_att": 16,
        a + "msa.msa_module.c_hidden_opm": 16,
        a + "msa.msa_module.no_heads_pair": 2,
        a + "msa.msa_module.no_heads_msa": 4,
        a + "template.template_pair_stack.c_hidden_tri_mul": 16,
        a + "template.template_pair_stack.c_hidden_tri_att": 8,
        a + "template.template_pair_stack.no_heads": 2,
        # Few diffusion samples and rollout steps: seconds per step on a CPU.
        a + "shared.diffusion.no_samples": 2,
        a + "shared.diffusion.no_mini_rollout_steps": 2,
        a + "shared.diffusion.no_full_rollout_steps": 20,
        a + "shared.diffusion.no_full_rollout_samples": 1,
    }
    for stack in _STACKS:
        out[a + stack + ".no_blocks"] = 1
    for attention in _ATOM_ATTENTION:
        out[a + attention + ".c_hidden"] = 16
        out[a + attention + ".no_heads"] = 2
    for pf in _PAIRFORMERS:
        out[a + pf + ".no_heads_pair_bias"] = 4
        out[a + pf + ".c_hidden_pair_bias"] = 16
        out[a + pf + ".c_hidden_mul"] = 32
        out[a + pf + ".c_hidden_pair_att"] = 16
        out[a + pf + ".no_heads_pair"] = 2
    return out


def size_overrides(size: str) -> dict[str, Any]:
    """The dotted-path overrides of a named size preset."""
    if size == "tiny":
        return _tiny()
    if size == "full":
        return {}
    raise ConfigError(f"unknown OpenFold3 size {size!r}: expected one of {', '.join(SIZES)}")


def size_of_model(model: str) -> str:
    """`openfold3-tiny` -> `tiny`; anything else is a ConfigError naming the choices."""
    size = model.removeprefix(MODEL_PREFIX)
    if not model.startswith(MODEL_PREFIX) or size not in SIZES:
        choices = ", ".join(MODEL_PREFIX + s for s in SIZES)
        raise ConfigError(f"unknown OpenFold3 model {model!r}: expected one of {choices}")
    return size


def parse_overrides(text: str) -> dict[str, Any]:
    """FOLDFED_OF3_OVERRIDES: a JSON object of dotted config paths to plain JSON values."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"FOLDFED_OF3_OVERRIDES is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError("FOLDFED_OF3_OVERRIDES must be a JSON object of path -> value")
    for key, item in value.items():
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"FOLDFED_OF3_OVERRIDES: bad config path {key!r}")
        if isinstance(item, dict):
            raise ConfigError(
                f"FOLDFED_OF3_OVERRIDES: {key!r} maps to an object; give each leaf's full path"
            )
    return value


def apply_overrides(cfg: ConfigDict, overrides: Mapping[str, Any], source: str) -> None:
    """Set each dotted path of `overrides` in `cfg`; an unknown path is a ConfigError."""
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = cfg
        for i, part in enumerate(parents):
            try:
                node = node[part]
            except (KeyError, AttributeError, TypeError):
                where = ".".join(parents[: i + 1])
                raise ConfigError(f"{source}: {path!r}: no config section {where!r}") from None
        try:
            current = node[leaf]
        except (KeyError, AttributeError, TypeError):
            raise ConfigError(f"{source}: {path!r}: no such config key") from None
        if hasattr(current, "keys"):
            raise ConfigError(f"{source}: {path!r} is a section, not a value")
        try:
            node[leaf] = value
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {path!r}={value!r}: {exc}") from None


def model_config(
    size: str, overrides: Mapping[str, Any] | None = None, *, confidence_only: bool = False
) -> ConfigDict:
    """OpenFold3's `train` preset, the size preset, our run settings, then `overrides`."""
    from openfold3.projects.of3_all_atom.project_entry import OF3ProjectEntry

    cfg = OF3ProjectEntry().get_model_config_with_presets(["train"])
    apply_overrides(cfg, size_overrides(size), f"size preset {size!r}")
    run = {
        "architecture.shared.num_recycles": 0,
        "settings.memory.eval.use_triton_triangle_kernels": False,
        "settings.memory.eval.tune_chunk_size": False,
        "settings.train_confidence_only": confidence_only,
    }
    apply_overrides(cfg, run, "run settings")
    apply_overrides(cfg, dict(overrides or {}), "FOLDFED_OF3_OVERRIDES")
    return cfg


def build_model(cfg: ConfigDict, seed: int) -> torch.nn.Module:
    """OpenFold3(cfg) with its initial weights drawn from `seed` (the caller's global RNGs
    are left as they were)."""
    import torch
    from openfold3.projects.of3_all_atom.model import OpenFold3

    from foldfed.of3.training import seeded

    # OpenFold3's initializers draw from torch, numpy (truncated normals) and `random`.
    with seeded(seed, "of3-model"):
        model = OpenFold3(copy.deepcopy(cfg))
    return model.to(torch.float32)


def count_parameters(cfg: ConfigDict) -> int:
    """Parameters of OpenFold3(cfg), counted on the meta device (no memory, no init)."""
    import torch
    from openfold3.projects.of3_all_atom.model import OpenFold3

    with torch.device("meta"):
        model = OpenFold3(copy.deepcopy(cfg))
    return sum(math.prod(p.shape) for p in model.parameters())
