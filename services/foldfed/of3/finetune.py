"""Which OpenFold3 parameters train, hence which travel.

Three modes (FOLDFED_OF3_FINETUNE):
- `all`: every parameter (OpenFold3's fine-tuning recipes 1 and 2);
- `confidence`: only the confidence heads, as OpenFold3's `train_confidence_only` does
  (the runner's `_freeze_model_params` exempts exactly these five submodules);
- `prefixes:a.b,c.d`: parameters whose dotted name is a listed prefix or starts with
  `prefix.`; a prefix that matches nothing is an error (a typo would freeze everything).

The federated model is the trainable parameters and nothing else: θ_t, Δ and the global
update all have exactly these tensors, so frozen weights never cross the network. Frozen
parameters and buffers come from the same place on every site (the preset's seeded init or
the shared checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from foldfed.errors import ConfigError

if TYPE_CHECKING:
    import torch

Kind = Literal["all", "confidence", "prefixes"]

# OpenFold3AllAtom.setup: the submodules train_confidence_only leaves trainable.
CONFIDENCE_MODULES: tuple[str, ...] = (
    "aux_heads.pairformer_embedding",
    "aux_heads.pde",
    "aux_heads.plddt",
    "aux_heads.experimentally_resolved",
    "aux_heads.pae",
)


@dataclass(frozen=True)
class FinetuneMode:
    kind: Kind = "all"
    prefixes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> FinetuneMode:
        text = text.strip()
        if text in ("", "all"):
            return cls("all")
        if text == "confidence":
            return cls("confidence", CONFIDENCE_MODULES)
        if text.startswith("prefixes:"):
            prefixes = tuple(p.strip() for p in text.removeprefix("prefixes:").split(","))
            if not prefixes or any(not p or p.startswith(".") or p.endswith(".") for p in prefixes):
                raise ConfigError(f"FOLDFED_OF3_FINETUNE={text!r}: empty or malformed prefix")
            return cls("prefixes", prefixes)
        raise ConfigError(
            f"FOLDFED_OF3_FINETUNE={text!r}: expected all, confidence or prefixes:a.b,c.d"
        )

    @property
    def confidence_only(self) -> bool:
        """OpenFold3's train_confidence_only: no diffusion training, confidence losses only."""
        return self.kind == "confidence"

    def __str__(self) -> str:
        if self.kind == "prefixes":
            return "prefixes:" + ",".join(self.prefixes)
        return self.kind


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def trainable_names(names: Iterable[str], mode: FinetuneMode) -> list[str]:
    """The parameter names `mode` trains, in the order given (ConfigError if a prefix
    matches no parameter, or nothing at all is trainable)."""
    names = list(names)
    if mode.kind == "all":
        return names
    for prefix in mode.prefixes:
        if not any(_matches(n, prefix) for n in names):
            raise ConfigError(f"FOLDFED_OF3_FINETUNE: prefix {prefix!r} matches no parameter")
    return [n for n in names if any(_matches(n, p) for p in mode.prefixes)]


def apply_mode(model: torch.nn.Module, mode: FinetuneMode) -> list[str]:
    """Set requires_grad per `mode`; returns the trainable names (model.named_parameters
    names: a tensor shared by two modules is listed once, under its first name)."""
    params = dict(model.named_parameters())
    chosen = set(trainable_names(params, mode))
    for name, param in params.items():
        param.requires_grad_(name in chosen)
    return [n for n in params if n in chosen]
