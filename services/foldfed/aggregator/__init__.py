"""The hub's aggregator: ingest (verify, store) plus the exact running sum, and the
finalization of each step's global update."""
