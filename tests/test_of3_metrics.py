"""Structure metrics on synthetic coordinates with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from foldfed.of3.metrics import kabsch, lddt, ligand_rmsd, rmsd, summarize


def _rotation(seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _complex(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 40-atom 'protein' blob around the origin and a 6-atom 'ligand' inside it."""
    g = torch.Generator().manual_seed(seed)
    protein = torch.randn(40, 3, generator=g) * 6.0
    ligand = torch.randn(6, 3, generator=g) * 1.5
    coords = torch.cat([protein, ligand])
    is_protein = torch.tensor([True] * 40 + [False] * 6)
    return coords, is_protein, ~is_protein


def test_kabsch_recovers_a_rigid_motion() -> None:
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(1))
    rot, shift = _rotation(2), torch.tensor([3.0, -4.0, 5.0])
    moved = x @ rot.T + shift
    r, t = kabsch(x, moved)
    assert torch.allclose(x.double() @ r.T + t, moved.double(), atol=1e-5)
    assert torch.linalg.det(r).item() == pytest.approx(1.0)


def test_kabsch_never_returns_a_reflection() -> None:
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(3))
    mirrored = x * torch.tensor([-1.0, 1.0, 1.0])
    r, _ = kabsch(x, mirrored)
    assert torch.linalg.det(r).item() == pytest.approx(1.0)


def test_ligand_rmsd_is_zero_for_a_rigidly_moved_prediction() -> None:
    true, is_protein, is_ligand = _complex()
    pred = true @ _rotation(5).T + torch.tensor([10.0, 0.0, -7.0])
    resolved = torch.ones(len(true), dtype=torch.bool)
    assert ligand_rmsd(pred, true, resolved, is_protein, is_ligand) == pytest.approx(0, abs=1e-5)


def test_ligand_rmsd_of_a_shifted_ligand_is_the_shift() -> None:
    true, is_protein, is_ligand = _complex()
    shift = torch.tensor([1.2, -0.9, 2.0])
    pred = true.clone()
    pred[is_ligand] += shift
    # Any rigid motion of the whole prediction changes nothing: the pocket is superposed.
    pred = pred @ _rotation(9).T + torch.tensor([0.0, 5.0, 0.0])
    resolved = torch.ones(len(true), dtype=torch.bool)
    got = ligand_rmsd(pred, true, resolved, is_protein, is_ligand)
    assert got == pytest.approx(float(shift.norm()), rel=1e-5)


def test_ligand_rmsd_needs_a_resolved_ligand_and_a_pocket() -> None:
    true, is_protein, is_ligand = _complex()
    unresolved_ligand = ~is_ligand
    assert ligand_rmsd(true, true, unresolved_ligand, is_protein, is_ligand) is None
    far = true.clone()
    far[is_ligand] += 1000.0  # no protein atom within 10 Å
    everything = torch.ones(len(true), dtype=torch.bool)
    assert ligand_rmsd(far, far, everything, is_protein, is_ligand) is None


def test_lddt_is_one_for_a_rigid_motion_and_falls_with_distortion() -> None:
    true, _, _ = _complex()
    resolved = torch.ones(len(true), dtype=torch.bool)
    moved = true @ _rotation(4).T + 3.0
    assert lddt(moved, true, resolved) == pytest.approx(1.0)
    noisy = true + torch.randn(true.shape, generator=torch.Generator().manual_seed(6)) * 1.0
    very = true + torch.randn(true.shape, generator=torch.Generator().manual_seed(6)) * 5.0
    a, b = lddt(noisy, true, resolved), lddt(very, true, resolved)
    assert a is not None and b is not None
    assert 0.0 < b < a < 1.0


def test_lddt_known_value_for_two_atoms() -> None:
    true = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    # Distance error 1.5 Å: passes the 2 and 4 Å thresholds, fails 0.5 and 1 -> 0.5.
    pred = torch.tensor([[0.0, 0.0, 0.0], [6.5, 0.0, 0.0]])
    assert lddt(pred, true, torch.ones(2, dtype=torch.bool)) == pytest.approx(0.5)


def test_unresolved_atoms_do_not_count() -> None:
    true, _, _ = _complex()
    pred = true.clone()
    pred[0] += 50.0
    resolved = torch.ones(len(true), dtype=torch.bool)
    resolved[0] = False
    assert lddt(pred, true, resolved) == pytest.approx(1.0)


def test_rmsd_and_summary() -> None:
    a = torch.zeros(4, 3)
    b = torch.tensor([[3.0, 4.0, 0.0]] * 4)
    assert rmsd(a, b) == pytest.approx(5.0)
    out = summarize({"ligand_rmsd": [1.0, 3.0], "lddt": [0.5], "empty": []})
    assert out == {
        "ligand_rmsd_mean": 2.0,
        "ligand_rmsd_count": 2.0,
        "ligand_rmsd_success": 0.5,
        "lddt_mean": 0.5,
        "lddt_count": 1.0,
    }
    assert all(math.isfinite(v) for v in out.values())


def test_per_sample_clipping_scales_to_the_max_norm() -> None:
    from foldfed.of3.training import clip_scale

    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]  # global norm 5
    assert clip_scale(grads, 10.0) == 1.0
    assert clip_scale(grads, 2.5) == pytest.approx(0.5)
    assert clip_scale([torch.zeros(3)], 1.0) == 1.0
