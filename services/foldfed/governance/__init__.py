"""Checkpoint governance: a checkpoint becomes a consortium release only with M-of-N
signed approvals (docs/operating-model.md).

`release` decides (pure), `bundle` reads and writes the files, `commands` is the
`foldfed keys` and `foldfed checkpoint` command line.
"""
