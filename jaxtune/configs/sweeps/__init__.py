"""Sweep files: `get_sweep()` says which config keys to search and how (jaxtune/sweep/space.py)."""
