"""Load tests of straggler scenarios against the real services (`foldfed loadtest`).

Pure parts (no I/O): `scenario` (YAML → validated dataclasses), `distributions` (seeded
compute times), `predict` (the analytic model) and `timeline` (measured attribution).
Shells: `simtrainer` (a trainer that sleeps its compute time and writes deltas of the
scenario's size through the real spool), `runner` (drives the real broker, hub and
uploaders through `demo.cluster.LocalFederation`), `report` (markdown + PNGs).
"""
