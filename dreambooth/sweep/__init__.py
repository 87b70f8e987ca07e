"""Sweeps: many runs (a grid of settings x subjects) as Ray Tune trials, one normal run folder each.

grid.py (trials as plain data) and summary.py need nothing beyond the base install; trial.py runs one trial in a
worker; engine.py is the only module that imports Ray (the `sweep` extra)."""
