"""The name of a feature file: blake3 of the mmCIF bytes, the settings, and the versions of
everything that changes features (openfold3, the CCD biotite ships, rdkit, the feature
file format), so a changed input, setting or library never reuses stale features.

    key = blake3(len(header) as 8 bytes big-endian || header || mmCIF bytes)
    header = JSON {"settings": ..., "versions": ...}, keys sorted
"""

from __future__ import annotations

import json
from dataclasses import asdict

from foldfed.of3.data.example import FeatureSettings
from foldfed.of3.data.features import FORMAT


def versions() -> dict[str, str]:
    """The versions that change features: part of every cache key."""
    from importlib.metadata import version

    from foldfed.of3.data.ccd import ccd_version

    return {
        "format": FORMAT,
        "openfold3": version("openfold3"),
        "ccd": ccd_version(),
        "rdkit": version("rdkit"),
    }


def cache_key(cif_bytes: bytes, settings: FeatureSettings) -> str:
    """blake3 hex of (mmCIF bytes, settings, versions): the feature file's name."""
    import blake3

    header = json.dumps(
        {"settings": asdict(settings), "versions": versions()}, sort_keys=True
    ).encode()
    h = blake3.blake3(len(header).to_bytes(8, "big"))
    h.update(header)
    h.update(cif_bytes)
    return h.hexdigest()
