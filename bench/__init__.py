"""Benchmarks, each as `python -m bench.NAME`: the step (step), checkpoint save and load
(checkpoint), the token cache build (tokens). Ratios measured side by side in one run."""
