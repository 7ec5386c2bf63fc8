"""The monitor: per-participant compute/upload/wait, barrier idle attribution, stragglers,
silent participants and ETA, served as a dashboard, Prometheus metrics and JSON."""
