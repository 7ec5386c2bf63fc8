"""The trainer: builds θ_t from released updates, trains locally, writes Δ to the spool."""
