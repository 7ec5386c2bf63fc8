"""Hub-side ingest: verify, store and account for the chunks participants deliver."""
