"""Secure aggregation: pairwise masks on the ring of the fixed-point sum (docs/format.md)."""
