"""Gating for the cycle after a published release: the late joiner's way in.

Cycle n+1 starts from cycle n's final model (barrier/gating.py: θ0(n+1) is n's final
model, released as step R+1). A company that was not a member of cycle n holds neither
that model nor its digest, and a readiness record must name both. The consortium's
published release of that model (`foldfed checkpoint publish`) is exactly what it needs:
a file, and its blake3 vouched for by M of the N companies. So `foldfed gate check
--after-release BUNDLE` verifies the bundle against the consortium keyring, gates for the
release's cycle + 1 with the bundle's weights as θ0, and, once ready, makes those weights
the spool's model at the release's step.

Why the spool: every participant's queue receives every broadcast, so a late joiner's
queue still holds cycle n's releases when its gateway starts. A trainer with no model
would take cycle n's first release as its own first and train from the wrong θ. With
θ_{R+1} committed at step R+1 it resumes after R: cycle n's final release finds the model
already there (same digest), and cycle n+1's first release (step R+2, no update) trains
from it. A member of cycle n already holds θ_{R+1} at step R+1, so nothing changes for it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from foldfed.errors import ConfigError
from foldfed.governance.bundle import bundle_weights, read_bundle, weights_digest
from foldfed.governance.release import judge
from foldfed.signing import Keyring
from foldfed.spool import Spool


@dataclass(frozen=True)
class NextCycle:
    """The cycle after a published release, and the θ0 it starts from."""

    cycle: int  # the release's cycle + 1
    step: int  # the release's step: the model it releases is θ at this step
    weights: Path  # the bundle's weights file
    digest: str  # its blake3, hex, as the release names it
    approvers: tuple[str, ...]


def from_release(bundle: Path, keyring: Keyring) -> NextCycle:
    """The next cycle's terms from a published bundle; ConfigError with `verify`'s reason
    when the bundle is no valid release under `keyring`."""
    release = read_bundle(bundle)
    weights = bundle_weights(bundle, release)
    if not weights.is_file():
        raise ConfigError(f"{bundle}: no weights file {weights.name}")
    verdict = judge(release, weights_digest(weights), keyring)
    if not verdict.valid or verdict.proposal is None:
        raise ConfigError(f"{bundle} is not a consortium release: {verdict.reason}")
    proposal = verdict.proposal
    return NextCycle(
        proposal.cycle + 1, proposal.step, weights, proposal.weights.blake3, verdict.approvers
    )


def adopt_theta0(nxt: NextCycle, spool_dir: Path) -> bool:
    """Commit the release's weights as the spool's model at its step (module docstring),
    unless the spool already holds that step or a later one; True when it committed."""
    spool = Spool(spool_dir)
    current = spool.current_model()
    if current is not None and current.step >= nxt.step:
        return False
    target = spool.snapshot_path(nxt.step)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(nxt.weights, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    spool.commit_model(nxt.step, bytes.fromhex(nxt.digest))
    return True
