"""Benchmarks for imagefs: realistic images, cold-start measurements, baselines.

Each command is a module ``bench/<command>.py`` exposing ``main(argv) -> int``; run it
as ``python -m bench <command>``. bench may import the project; the project never
imports bench.
"""
