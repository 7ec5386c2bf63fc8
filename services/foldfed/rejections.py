"""Rejection reasons in classes: what a hub service counts when it refuses a message.

Every refusal carries a reason in words (a `Reject`, a decode error, a sender check), and
the words name values (a step, a digest, a user), so they cannot be counted as they are.
`reason_class` maps a reason to one of a few stable class names by the fixed phrases the
hub's checks use (ingest/rules.py, ingest/checks.py, codedvector.py, messages.py,
aggregation/*, the barrier's and the monitor's sender checks); `RejectionCounts` counts
refusals per class. The first matching rule wins, so a wrapper that quotes another reason
("hub could not process it: ...") is named for itself. A reason no rule knows is "other":
the hostile-message tests (tests/test_hostile_services.py) require that none of theirs is,
so a new refusal without a class shows up there.

Pure: no I/O.
"""

from __future__ import annotations

from collections import Counter

OTHER = "other"

# (class, phrases): a reason belongs to the first class one of whose phrases it contains.
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hub-failure", ("hub could not process it",)),
    ("forged-sender", ("forged sender",)),
    ("hub-only", ("only the hub",)),
    ("wrong-queue", ("does not belong on",)),
    ("unknown-type", ("unknown message type",)),
    ("malformed", ("malformed ",)),
    # A number that must be finite (and mostly > 0) is not: NaN, infinities, weights <= 0.
    ("bad-number", ("non-finite", "must be finite", "is not finite")),
    ("unknown-participant", ("unknown participant",)),
    ("closed-step", ("is closed (step",)),
    ("unknown-step", ("unknown step",)),
    ("not-released", ("not released yet",)),
    ("not-member", ("is not a member of the cycle",)),
    ("release-conflict", ("already released with model",)),
    ("conflicting-manifest", ("conflicting manifest",)),
    ("wrong-base-model", ("delta was computed against model",)),
    ("non-canonical", ("not in canonical form",)),
    ("weight", ("agreed no weight", "differs from the weight the cycle agreed")),
    ("over-bound", ("over the bound",)),
    # Secure aggregation (docs/format.md 9.10): masked payloads where none may be, or none
    # where they must be, another ring or cycle, an attested norm above the bound.
    ("masking", ("masked", "masks ", "secure aggregation", "ring_bits", "attested")),
    ("oversized", ("oversized", "payload_size")),
    ("digest-mismatch", ("digest mismatch", "is not the manifest's")),
    ("chunk-mismatch", ("out of range: manifest has", "the manifest says", "its range needs")),
    (
        "codec",
        (
            "codec",
            "coded vector",
            "shared ranges",
            "block statistics",
            "cannot hold",
            "chunk sizes add up",
            "element range",
            "vector is empty",
            "chunk plan",
            "does not decode",
        ),
    ),
    (
        "layout",
        (
            "not part of the model",
            "missing from it",
            "tensor name twice",
            "dtype mismatch",
            "shape mismatch",
            "only floating tensors",
            "cuts an element",
            "fixed-point grid",
        ),
    ),
    (
        "invalid-field",
        (
            "bad chunk_size",
            "lists no tensors",
            "tensor '",
            "tensors end at byte",
            "chunk digests;",
            "format_version",
            "must be 32 bytes",
            "unknown event kind",
            "weights for",
        ),
    ),
    ("finalize", ("cannot finalize", "never finalized")),
)


def reason_class(reason: str) -> str:
    """The class of a rejection `reason` (OTHER when no rule knows it)."""
    for name, phrases in _RULES:
        if any(phrase in reason for phrase in phrases):
            return name
    return OTHER


def known_classes() -> tuple[str, ...]:
    """Every class `reason_class` can return, OTHER last."""
    return (*(name for name, _ in _RULES), OTHER)


class RejectionCounts:
    """Refusals counted per reason class, for a service's log and its monitor's page."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def count(self, reason: str) -> str:
        """Count one refusal; returns its class."""
        name = reason_class(reason)
        self._counts[name] += 1
        return name

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """Class -> count, classes in name order (stable for logs and JSON)."""
        return dict(sorted(self._counts.items()))
