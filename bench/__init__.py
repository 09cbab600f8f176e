"""Benchmarks: each module has ``run(out_dir) -> dict`` that prints its figures and writes <area>.json."""
