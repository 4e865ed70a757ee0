"""Hyper-parameter sweeps: `python -m jaxtune.sweep` (space.py: the sweep file; run.py: the study and its trials)."""
