"""The context OpenFold3's data pipeline runs in: seeded global generators, quiet logs.

OpenFold3's preprocessing and featurizers draw from the process-wide generators (RDKit
conformer seeds: `random`; the reference-conformer rotation: torch) and log every
structure. Both steps of building an example (`preprocess`, `featurize`) run inside these
two contexts, so the same entry and seed give the same bytes and the console stays readable.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's, numpy's and torch's global generators; restore them afterwards.

    OpenFold3's data pipeline draws from the global generators (RDKit conformer seeds:
    `random`; reference-conformer rotation: torch; numpy for good measure).
    """
    import numpy as np
    import torch

    py_state, np_state, torch_state = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
    )
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


@contextlib.contextmanager
def quiet_openfold3() -> Iterator[None]:
    """OpenFold3 logs every structure at INFO and warns per atom; keep errors only."""
    import logging
    import warnings

    log = logging.getLogger("openfold3")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)
