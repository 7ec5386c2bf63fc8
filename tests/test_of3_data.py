"""OpenFold3 training data from real protein-ligand complexes (plinder 0.2.27's mmCIFs).

One session fixture fetches the plinder sdist (PyPI, then cached in ~/.cache/foldfed or
$FOLDFED_CACHE_DIR) and featurizes three real entries once; the tests share that cache.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from foldfed.of3.data import plinder
from foldfed.of3.data.ccd import OfflineCcd
from foldfed.of3.data.features import (
    CachedFeatures,
    FeatureSettings,
    featurize_cached,
    load_batch,
)

BUDGET = 48
ENTRIES = ("7bqu", "2hyy", "3g32")  # EF2 + zinc; imatinib (STI) on ABL; a small ligand


@pytest.fixture(scope="session")
def cifs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    sdist = plinder.fetch_sdist(plinder.default_cache_dir())
    return plinder.extract_entries(sdist, tmp_path_factory.mktemp("plinder-cif"))


@pytest.fixture(scope="session")
def ccd() -> OfflineCcd:
    return OfflineCcd()


@pytest.fixture(scope="session")
def featured(
    cifs: dict[str, Path], ccd: OfflineCcd, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, CachedFeatures]:
    cache = tmp_path_factory.mktemp("of3-features")
    settings = FeatureSettings(token_budget=BUDGET, seed=0)
    return {e: featurize_cached(cifs[e], cache, ccd, settings) for e in ENTRIES}


def _tiny_model() -> tuple[torch.nn.Module, torch.nn.Module]:
    from openfold3.core.loss.loss_module import OpenFold3Loss
    from openfold3.projects.of3_all_atom.model import OpenFold3

    from foldfed.of3.data._testing import tiny_model_config

    cfg = tiny_model_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = OpenFold3(cfg)
    return model.train(), OpenFold3Loss(cfg.architecture.loss_module)


# Loss terms that real ground truth must switch on. OpenFold3 zeroes every loss weight
# (loss 0.0, tests still green) when the ground truth cannot be aligned.
EXPECTED_TERMS = (
    "mse_loss",
    "smooth_lddt_loss",
    "diffusion_loss",
    "distogram_loss",
    "plddt_loss",
    "pde_loss",
    "pae_loss",
    "experimentally_resolved_loss",
    "confidence_loss",
)


@pytest.mark.slow
def test_tiny_openfold3_trains_on_a_real_complex(featured: dict[str, CachedFeatures]) -> None:
    model, loss_fn = _tiny_model()
    batch = load_batch(featured["7bqu"].path)
    assert batch["token_mask"].shape == (1, BUDGET)
    assert batch["ground_truth"]["atom_resolved_mask"].sum() > 0
    assert all(float(w) > 0 for k, w in batch["loss_weights"].items() if k != "bond")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        batch, outputs = model(batch)
        loss, breakdown = loss_fn(batch, outputs, _return_breakdown=True)
    assert torch.isfinite(loss) and float(loss) > 0.1
    terms = {k: float(v) for k, v in breakdown.items()}
    print("loss terms (7bqu, tiny model):", {k: round(v, 4) for k, v in terms.items()})
    for term in EXPECTED_TERMS:
        assert term in terms, f"{term} missing from the loss breakdown"
        assert math.isfinite(terms[term]) and terms[term] > 0, f"{term} = {terms[term]}"
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_load_batch_is_fresh_every_call(featured: dict[str, CachedFeatures]) -> None:
    path = featured["7bqu"].path
    first = load_batch(path)
    first["ground_truth"]["atom_positions"].add_(100.0)
    first.pop("token_mask")
    second = load_batch(path)
    assert "token_mask" in second
    assert not torch.equal(
        first["ground_truth"]["atom_positions"], second["ground_truth"]["atom_positions"]
    )
    assert isinstance(second["ref_space_uid_to_perm"], list)
    assert all(isinstance(k, int) for k in second["ref_space_uid_to_perm"][0])
