"""`foldfed verify`: a hub's state folder checked offline against its signed records
(state.py), and its command line (commands.py). The checks themselves are the pure
`foldfed.audit` package; this one reads files and recomputes with the aggregator's code.
"""
