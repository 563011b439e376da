"""Optuna sweeps, by concern: the search space, the storage and claims, the sweep, and its reports."""
