"""loraplex benchmarks: multi-adapter serving vs base-only and vs PEFT, measured over real HTTP.

Run `python -m bench` (full, < 15 min on two CPU cores) or `python -m bench --quick`.
"""
