"""Peer queue libraries on the claim workload: see __main__.py and bench/README.md."""
