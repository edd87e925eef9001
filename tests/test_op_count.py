"""The dispatch-hook op counter sees every kernel of a decode step; the fused and compiled steps launch fewer."""

from __future__ import annotations

import torch

from dynts.experiments.op_count import OpCounter, count_fused_step_kernels, count_step_ops


def test_counter_counts_kernels_not_views():
    counter = OpCounter()
    x = torch.randn(4, 6)
    with counter:
        y = (x.t().reshape(6, 4) * 2).sum()
    assert counter.kernels == 2 and sum(counter.ops.values()) >= 4  # mul and sum; t, view/reshape are views
    assert float(y) == float((x * 2).sum())


def test_fused_and_compiled_steps_launch_fewer_kernels(make_tiny):
    lm = make_tiny("qwen2")
    model = count_step_ops(lm, "full", fused=False, rows=3)
    fused = count_fused_step_kernels(lm, "full", rows=3)
    assert model.kernels > fused["eager"] > fused["compiled"] > 0
    assert all(r["compiled"] < r["eager"] for r in fused["regions"])
