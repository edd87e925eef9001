"""The static fast decode path: fixed shapes, CUDA graphs, length-aware decode attention, no host sync per step."""
