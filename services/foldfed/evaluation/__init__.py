"""Federated evaluation at the hub: the table of every company's evaluated releases against
its baselines (table.py), read from what the monitor stored (source.py), drawn (plot.py),
and `foldfed eval table` (commands.py)."""
