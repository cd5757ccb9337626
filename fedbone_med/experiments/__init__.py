"""Experiment runners: the in-process federation, reproductions and baselines."""
