"""OpenFold3 for foldfed: training data from real protein-ligand complexes (`data/`) and the
model adapter the trainer uses (presets, fine-tuning modes, checkpoints, training rounds,
local evaluation, DDP). Importing this package imports neither torch nor openfold3.
"""
