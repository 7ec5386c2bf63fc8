"""The demo's summary speaks in units a person reads: the demo's model is kilobytes, the
consortium's gigabytes, and "0.0 MB moved" told a reader nothing."""

from __future__ import annotations

import pytest

from foldfed.demo.report import human_bytes


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (999, "999 B"), (17_170, "17.2 kB"), (294_000, "294.0 kB"), (1.47e9, "1.5 GB")],
)
def test_byte_counts_read_in_the_unit_that_fits(n: float, text: str) -> None:
    assert human_bytes(n) == text
