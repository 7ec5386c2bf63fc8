"""Structure metrics co-folding users read, as pure torch functions (no I/O).

- `lddt`: all-atom LDDT (Mariani et al. 2013): for every pair of resolved atoms closer than
  15 Å in the ground truth, the fraction of the thresholds 0.5, 1, 2, 4 Å within which
  the predicted distance stays; averaged over pairs. Superposition-free.
- `ligand_rmsd`: ligand RMSD after pocket alignment, as docking benchmarks (PoseBusters)
  report it: the pocket is every resolved protein atom within 10 Å of a resolved ligand atom
  in the ground truth; the prediction is superposed onto the truth on the pocket atoms
  (Kabsch, no scaling), and the RMSD is taken over the ligand atoms.

Coordinates are (N, 3) float tensors of one structure; masks are (N,) booleans.
"""

from __future__ import annotations

import math

import torch

LDDT_CUTOFF = 15.0
LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
POCKET_CUTOFF = 10.0
LIGAND_SUCCESS = 2.0  # Å: the usual "pose found" threshold


def kabsch(mobile: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation R and translation t minimizing |mobile @ R.T + t - target| (proper
    rotation, det R = +1). Both (N, 3), N >= 3 for a unique answer. Computed in float64."""
    if mobile.shape != target.shape or mobile.ndim != 2 or mobile.shape[1] != 3:
        raise ValueError(f"need two (N, 3) tensors, got {mobile.shape} and {target.shape}")
    if mobile.shape[0] < 1:
        raise ValueError("cannot superpose zero atoms")
    p, q = mobile.double(), target.double()
    p_mean, q_mean = p.mean(dim=0), q.mean(dim=0)
    h = (p - p_mean).T @ (q - q_mean)
    u, _, vt = torch.linalg.svd(h)
    d = torch.sign(torch.linalg.det(vt.T @ u.T))
    # A reflection is not a motion: flip the last axis when the best fit would mirror.
    fix = torch.diag(torch.tensor([1.0, 1.0, 1.0 if d >= 0 else -1.0], dtype=torch.float64))
    rotation = vt.T @ fix @ u.T
    translation = q_mean - p_mean @ rotation.T
    return rotation, translation


def rmsd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square deviation of two (N, 3) sets, no superposition."""
    if a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(
            f"need two non-empty (N, 3) tensors of one shape, got {a.shape}, {b.shape}"
        )
    return math.sqrt(float(((a.double() - b.double()) ** 2).sum(dim=-1).mean()))


def ligand_rmsd(
    pred: torch.Tensor,
    true: torch.Tensor,
    resolved: torch.Tensor,
    is_protein: torch.Tensor,
    is_ligand: torch.Tensor,
    pocket_cutoff: float = POCKET_CUTOFF,
) -> float | None:
    """Ligand RMSD (Å) after superposing the pocket; None when there is no resolved ligand
    or fewer than 3 pocket atoms (the superposition would be undetermined)."""
    resolved = resolved.bool()
    ligand = is_ligand.bool() & resolved
    protein = is_protein.bool() & resolved
    if not bool(ligand.any()):
        return None
    dist = torch.cdist(true[protein].double(), true[ligand].double())
    near = (dist < pocket_cutoff).any(dim=1)
    pocket_index = protein.nonzero().squeeze(1)[near]
    if pocket_index.numel() < 3:
        return None
    rotation, translation = kabsch(pred[pocket_index], true[pocket_index])
    moved = pred[ligand].double() @ rotation.T + translation
    return rmsd(moved, true[ligand])


def lddt(
    pred: torch.Tensor,
    true: torch.Tensor,
    resolved: torch.Tensor,
    cutoff: float = LDDT_CUTOFF,
    thresholds: tuple[float, ...] = LDDT_THRESHOLDS,
) -> float | None:
    """All-atom LDDT in [0, 1]; None when no pair of resolved atoms is within `cutoff`."""
    mask = resolved.bool()
    p, t = pred[mask].double(), true[mask].double()
    if p.shape[0] < 2:
        return None
    d_true = torch.cdist(t, t)
    d_pred = torch.cdist(p, p)
    pairs = (d_true < cutoff) & ~torch.eye(len(t), dtype=torch.bool)
    if not bool(pairs.any()):
        return None
    error = (d_true - d_pred).abs()[pairs]
    score = torch.stack([(error < th).double() for th in thresholds]).mean(dim=0)
    return float(score.mean())


def summarize(values: dict[str, list[float]]) -> dict[str, float]:
    """Aggregates only (what may leave the company): the mean of each metric over the
    structures that have it, how many had it, and for ligand RMSD the success rate."""
    out: dict[str, float] = {}
    for name, items in sorted(values.items()):
        if not items:
            continue
        out[f"{name}_mean"] = math.fsum(items) / len(items)
        out[f"{name}_count"] = float(len(items))
        if name == "ligand_rmsd":
            out["ligand_rmsd_success"] = sum(v < LIGAND_SUCCESS for v in items) / len(items)
    return out
