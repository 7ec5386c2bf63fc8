"""Test helpers for the data package: a tiny OpenFold3 to run forward + loss on real
examples. Self-contained on purpose (the trainer's presets live in `foldfed.of3` and may
change); same recipe as FIELD_NOTES: narrow widths, one block per stack, no recycles.
"""

from __future__ import annotations

from typing import Any

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


def tiny_model_config() -> Any:
    """OpenFold3's `train` preset shrunk to a CPU-seconds model (deterministic: no
    recycles, two diffusion samples)."""
    from openfold3.projects.of3_all_atom.project_entry import OF3ProjectEntry

    cfg = OF3ProjectEntry().get_model_config_with_presets(["train"])
    arch = cfg.architecture
    arch.shared.c_s = 64
    arch.shared.c_z = 32
    arch.msa.msa_module.c_m = 16
    arch.template.c_t = 16
    for stack in _STACKS:
        node = arch
        for part in stack.split("."):
            node = node[part]
        node.no_blocks = 1
    arch.shared.num_recycles = 0
    arch.shared.diffusion.no_samples = 2
    arch.shared.diffusion.no_mini_rollout_steps = 2
    cfg.settings.memory.eval.use_triton_triangle_kernels = False
    return cfg
