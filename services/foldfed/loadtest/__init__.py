"""Load tests of straggler scenarios against the real services (`foldfed loadtest`).

Pure parts (no I/O): `scenario` (YAML → validated dataclasses), `distributions` (seeded
compute times), `predict` (the analytic model), `timeline` (measured attribution) and
`verdicts` (the checks a run must pass). Shells: `runner` (drives the real broker, hub,
uploaders and trainers through `demo.cluster.LocalFederation`; the trainers run the `sim`
model family, trainer/backends/sim.py), `barrierlog` (reads the barrier's store) and
`report` (markdown + PNGs).
"""
