"""The `openfold3-tiny` and `openfold3-full` families: OpenFold3 (of3/backend.py) on the
site's prepared sample, one GPU per rank when torchrun started a DDP job (of3/ddp.py).
Settings: FOLDFED_OF3_* (of3/backend.py), and the trainer's FOLDFED_LOCAL_STEPS and
FOLDFED_GRAD_ACCUM. Needs the `of3` extra; openfold3 is imported when the model is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from foldfed.errors import FoldfedError
from foldfed.of3.backend import Of3Backend, Of3Settings, write_initial_model
from foldfed.settings import Settings, env_for
from foldfed.trainer.backend import TrainerSettings

# A demo on CPUs: short rounds (K=2 optimizer steps of G=2 structures), no warm-up, so the
# held-out loss moves within a few global steps; the recipe's lr otherwise; every site
# scores the shared held-out entries, so the sites' curves are comparable; and every other
# release (and the final one) is evaluated on the site's own held-out set against θ₀ (the
# federated evaluation table the demo ends with).
DEMO_SETTINGS: dict[str, Any] = {
    "local_steps": 2,
    "grad_accum": 2,
    "of3_warmup": 0,
    "of3_lr": 1e-3,
    "of3_eval": "global",
    "eval_every": 2,
}


class Of3Family:
    def __init__(self, name: str) -> None:
        self.name = name

    def settings_from(self, settings: Settings) -> Of3Settings:
        return Of3Settings.from_settings(settings)

    def make_backend(self, settings: TrainerSettings) -> Of3Backend:
        """Joins the DDP job torchrun started, if any (rank 0 leads, the others follow)."""
        from foldfed.of3.ddp import init_from_env

        of3 = settings.family_settings
        if not isinstance(of3, Of3Settings):
            raise TypeError(f"{self.name}: family_settings must be Of3Settings, got {of3!r}")
        return Of3Backend(
            of3,
            participant=settings.participant,
            participant_index=settings.participant_index,
            seed=settings.seed,
            local_steps=settings.local_steps,
            grad_accum=settings.grad_accum,
            dist=init_from_env(),
            initial_model=settings.initial_model,
            cache_dir=settings.spool_dir / "eval",
        )

    def write_initial_model(self, path: Path, settings: Settings, seed: int) -> bytes:
        """The seeded preset's trainable state, or FOLDFED_OF3_CHECKPOINT's."""
        return write_initial_model(path, Of3Settings.from_settings(settings), seed)

    def demo_env(self, participants: tuple[str, ...], sample_dir: Path) -> dict[str, str]:
        """Prepares the real sample (one company per participant) if it is missing."""
        from foldfed.of3.data.sample import open_sample, prepare_sample

        try:
            ready = tuple(open_sample(sample_dir).companies) == participants
        except FoldfedError:
            ready = False
        if not ready:
            print(f"  preparing the real sample in {sample_dir} (minutes, once) ...")
            prepare_sample(sample_dir, len(participants))
        return env_for(**DEMO_SETTINGS, model=self.name, of3_sample=sample_dir.resolve())


def family(name: str) -> Of3Family:
    return Of3Family(name)
