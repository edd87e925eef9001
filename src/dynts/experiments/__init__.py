"""Experiments over the engine and harness: budget sweeps and figures, fidelity replay, throughput benchmarks."""
