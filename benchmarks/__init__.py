"""Microbenchmarks of gfl_ops against its peers, and the detector's loss-step benchmark.

Run ``python -m benchmarks.run --help`` from the repository root; see benchmarks/README.md.
"""
