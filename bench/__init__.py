"""trainfleet's benchmarks: each figure is ours, a floor measured in the same run, and the ratio.

Run `python -m bench` (or `make bench`); see bench/README.md. Never imported by the package.
"""
