"""A small real sample for the OpenFold3 tests, benchmarks and the demo: twelve plinder
complexes shared among three companies (three training and one held-out entry each),
featurized once and cached (features are named by content, so a cache never goes stale)."""

from __future__ import annotations

from pathlib import Path

from foldfed.settings import load

REPO = Path(__file__).resolve().parents[3]
# Complexes OpenFold3's preprocessing accepts, each with a drug-like ligand (among the 27
# of plinder's 37 entries that featurize: docs/of3_data.md, "The real sample").
TEST_ENTRIES = (
    "1ppc", "1qz5", "2gdo", "2hyy", "2p1q", "3g32",
    "4jvn", "4qyf", "4tz4", "6m92", "6ntj", "7bqu",
)  # fmt: skip
COMPANIES = ("company-a", "company-b", "company-c")


def default_dir() -> Path:
    """var/test-cache/of3-sample in the repository, or $FOLDFED_TEST_CACHE/of3-sample."""
    return (load().test_cache or REPO / "var" / "test-cache") / "of3-sample"


def prepared_sample(out: Path | None = None, companies: int = 3) -> Path:
    """The sample folder (sample.json + features), prepared if missing (about a minute)."""
    from foldfed.of3.data.sample import open_sample, prepare_sample

    out = out or default_dir()
    try:
        sample = open_sample(out)
        if len(sample.companies) == companies and len(sample.entries) == len(TEST_ENTRIES):
            return out
    except Exception:  # absent or stale: prepare it again
        pass
    prepare_sample(out, companies, only=TEST_ENTRIES)
    return out
