"""Performance harness for tritonbn: sweeps, plots, the memory-traffic audit and the training-step benchmark.

Run it as `tritonbn-perf` (see `tritonbn.perf.cli`). Importing this package imports nothing heavy.
"""
