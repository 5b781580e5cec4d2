"""Reproducing the paper: its published numbers, the preset registry, sweeps over presets,
and the results page built from their runs."""
