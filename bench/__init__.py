"""airspeed-velocity benchmarks for bitnet-fast (numpy's layout: one module per area, shared inputs in common.py)."""
