"""The trainer: builds θ_t from released updates, trains locally, writes Δ to the spool.

`service` is the process (spool in, spool out), `backend` the model-family boundary and its
registry, `backends/` the families (mlp, openfold3, sim), `local` and `task` the mlp's round
and data, `ddp_entry` the trainer as a torch DDP job.
"""
