"""Speed benchmarks, run from the repository root as modules:

    python -m benchmarks.layer_bench
    python -m benchmarks.model_bench

Each prints ratios against a baseline measured in the same run, and the
machine it ran on; docs/speed.md holds the results.
"""
