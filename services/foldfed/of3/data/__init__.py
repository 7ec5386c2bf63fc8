"""OpenFold3 training data from real protein-ligand complexes.

mmCIF in; OpenFold3's own preprocessing (cleanup, reference conformers) with an offline
chemical-components dictionary from biotite; a deterministic crop around the ligand;
OpenFold3's featurization; one safetensors file per example, named by a content hash.
See docs/of3_data.md.

Modules: `ccd` (offline CCD); one example: `example` (its settings, description and
errors), `preprocess` (OpenFold3's structure cleanup, the ligand census), `pocket` (the
primary ligand and the crop around it), `featurize` (`build_features`: the whole pipeline),
`pipeline_context` (seeded, quiet), `features` (the feature file, `load_batch`),
`cachekey` (its name), `cache` (`featurize_cached`); `partition` (the held-out and
company rule, pure), `components` (entries joined by shared labels, pure), `scaffold`
(ligand scaffolds from the CCD), `plinder` (the real sample's source files), `sample`
(`prepare_sample`, `open_sample`), `sample_split` (`summary_table`, how far companies
differ, `repartition`), `split_standard` (the blind-split reference hash, pure),
`commands` (`foldfed data ...`).
Validation (docs/data_schema.md): `schema` (version, checks, thresholds, inclusion
criteria; pure), `structure_file` (one mmCIF read with biotite), `plausibility` (RDKit
sanitization, PoseBusters), `datacard` (the aggregate-only card; pure), `validate`
(`validate_dir`: the whole pass and its local report).
"""
