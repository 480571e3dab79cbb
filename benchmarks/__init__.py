"""Reproducible speed and quality benchmarks; each script prints one JSON line per result."""
