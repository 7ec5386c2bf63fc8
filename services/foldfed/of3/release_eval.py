"""Federated evaluation at one site: a due release scored on the site's held-out split beside
its baselines, θ₀ and (when the site has one) its local-only model.

Which releases: every k-th from the first and the final one (`is_due`; k =
FOLDFED_EVAL_EVERY, 0 turns it off). Release 1 *is* θ₀, so its row doubles as a check
that the table's two columns agree.

What leaves the site (in the model report of that release, docs/federated_evaluation.md):
the release's aggregates under `eval_*` and each baseline's under its prefix,
`theta0_eval_*` and `local_eval_*`. Every value is a mean, a rate or a count over the
held-out set; nothing names a structure (`check_aggregates` refuses a key that does).

Baselines are scored once: their metrics are kept in memory and in a small JSON file in
the spool (`BaselineCache`), keyed by the model file's digest and the evaluation's identity
(held-out feature files, seed, model settings), so a restarted trainer does not score θ₀
again and a changed held-out set does. A release bitwise equal to θ₀ reuses θ₀'s metrics.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from foldfed.durable import atomic_write
from foldfed.errors import FoldfedError

if TYPE_CHECKING:
    import torch

State = Mapping[str, "torch.Tensor"]
# θ -> aggregate metrics on the held-out split, keys "eval_*".
Score = Callable[[State], dict[str, float]]

RELEASE_PREFIX = "eval"
THETA0_PREFIX = "theta0_eval"
LOCAL_PREFIX = "local_eval"
CACHE_FORMAT = "foldfed.release-eval-baselines/1"

log = structlog.get_logger(__name__)


def load_model_file(path: Path) -> State:
    """A baseline's trainable state (the canonical file θ₀ is written as)."""
    from foldfed.deltafile import load_delta

    return load_delta(path)


def file_key(path: Path) -> str:
    """A baseline's cache identity: its file's digest."""
    from foldfed.digests import file_digest

    return file_digest(path).hex()


def is_due(step: int, every: int, final: bool) -> bool:
    """Releases 1, 1+k, 1+2k, ... and the final one are evaluated; none when k is 0."""
    if every <= 0:
        return False
    return final or (step - 1) % every == 0


def renamed(metrics: Mapping[str, float], old: str, new: str) -> dict[str, float]:
    """`old_x` -> `new_x` for every key (the release's metrics under a baseline's prefix)."""
    head = old + "_"
    return {new + "_" + k[len(head) :]: v for k, v in metrics.items() if k.startswith(head)}


def check_aggregates(metrics: Mapping[str, float], private_names: Iterable[str]) -> None:
    """Refuse metrics that would carry a structure out: a key naming a held-out structure
    or a value that is not one number."""
    names = [n for n in private_names if n]
    for key, value in metrics.items():
        if not isinstance(value, float | int) or isinstance(value, bool):
            raise FoldfedError(f"release evaluation: {key} is not one number")
        leak = next((n for n in names if n in key), None)
        if leak is not None:
            raise FoldfedError(f"release evaluation: {key} names the structure {leak}")


@dataclass(frozen=True)
class Baseline:
    """A model the release is compared with: its prefix and its file (trainable state)."""

    prefix: str
    path: Path


class BaselineCache:
    """Baselines' metrics by cache key, in memory and in `path` (JSON; None: memory only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, dict[str, float]] = {}
        if path is not None and path.is_file():
            try:
                body = json.loads(path.read_text())
                if body.get("format") == CACHE_FORMAT:
                    self._entries = {k: dict(v) for k, v in body["entries"].items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("release evaluation: unreadable baseline cache, scoring again")

    def get(self, key: str) -> dict[str, float] | None:
        found = self._entries.get(key)
        return None if found is None else dict(found)

    def put(self, key: str, metrics: Mapping[str, float]) -> None:
        self._entries[key] = dict(metrics)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            body = {"format": CACHE_FORMAT, "entries": self._entries}
            atomic_write(self.path, json.dumps(body, sort_keys=True).encode())


class ReleaseEvaluator:
    """Scores a release and its baselines; each baseline once per (file, evaluation)."""

    def __init__(
        self,
        score: Score,
        baselines: Sequence[Baseline],
        cache: BaselineCache,
        *,
        identity: str,
        load_model: Callable[[Path], State],
        model_key: Callable[[Path], str],
        state_key: Callable[[State], str],
        private_names: Iterable[str] = (),
    ) -> None:
        self.score = score
        self.baselines = tuple(baselines)
        self.cache = cache
        self.identity = identity
        self.load_model = load_model
        self.model_key = model_key
        self.state_key = state_key
        self.private_names = tuple(private_names)
        # Baseline prefix -> key of its tensors, so a release equal to it is not scored.
        self._state_keys: dict[str, str] = {}

    def evaluate(self, theta: State) -> dict[str, float]:
        """The release's `eval_*` and every baseline's `<prefix>_*`, aggregates only."""
        baselines = {b.prefix: self._baseline(b) for b in self.baselines}
        release_key = self.state_key(theta) if self._state_keys else ""
        same = next((p for p, k in self._state_keys.items() if k == release_key), None)
        if same is not None:
            release = renamed(baselines[same], same, RELEASE_PREFIX)
        else:
            release = self.score(theta)
        out = dict(release)
        for metrics in baselines.values():
            out.update(metrics)
        check_aggregates(out, self.private_names)
        return out

    def _baseline(self, baseline: Baseline) -> dict[str, float]:
        key = f"{self.model_key(baseline.path)}:{self.identity}"
        found = self.cache.get(key)
        if found is not None and baseline.prefix in self._state_keys:
            return renamed(found, RELEASE_PREFIX, baseline.prefix)
        state = self.load_model(baseline.path)
        self._state_keys[baseline.prefix] = self.state_key(state)
        if found is None:
            log.info("release evaluation: scoring a baseline once", baseline=baseline.prefix)
            found = self.score(state)
            self.cache.put(key, found)
        return renamed(found, RELEASE_PREFIX, baseline.prefix)
