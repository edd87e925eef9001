"""Kernels (non-view aten ops) per decode step at a real shape: the model's forward, the fused decoder, compiled.

Counted on the CPU by a dispatch hook (dynts.experiments.op_count) with random weights at the shape's real width,
at two small layer counts (every layer costs the same ops) and extrapolated to the real depth; the vocabulary is
cut to 1024 (the LM head is one op whatever its size). Rows 20, as the GPU target.

    python benchmarks/op_count.py [--shape r1-qwen-7b] [--policy full] [--rows 20]
"""

from __future__ import annotations

import argparse

import torch

from dynts.config import BudgetConfig
from dynts.experiments.op_count import count_fused_step_kernels, count_step_ops
from dynts.models.importance_head import random_head
from dynts.models.loading import prepare_model
from dynts.models.shapes import NullTokenizer, shape_config


def shaped_model(shape: str, layers: int):
    from transformers import AutoModelForCausalLM

    config = shape_config(shape)
    config.num_hidden_layers, config.vocab_size = layers, 1024
    if hasattr(config, "layer_types"):
        config.layer_types = config.layer_types[:layers]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return prepare_model(model, NullTokenizer(), f"{shape}-{layers}-layers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="r1-qwen-7b")
    parser.add_argument("--policy", default="full")
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--layers", default="1,2", help="the two small layer counts counted (default 1,2)")
    args = parser.parse_args()
    depth = shape_config(args.shape).num_hidden_layers
    small = [int(x) for x in args.layers.split(",")]
    budget = BudgetConfig(None) if args.policy == "full" else BudgetConfig(64, 16, 0.5)
    counts = {}
    for layers in small:
        loaded = shaped_model(args.shape, layers)
        head = random_head(loaded.hidden_size) if args.policy.startswith("dynts") else None
        model = count_step_ops(loaded, args.policy, fused=False, rows=args.rows, budget=budget, head=head)
        fused = count_fused_step_kernels(loaded, args.policy, rows=args.rows, budget=budget, head=head)
        counts[layers] = (model.kernels, fused["eager"], fused["compiled"])
        print(f"{layers} layers: model forward {model.kernels}, fused {fused['eager']}, compiled {fused['compiled']}")
        print(f"  regions per call (eager -> compiled): {fused['regions']}")
        del loaded
    (a, ca), (b, cb) = sorted(counts.items())
    names = ("model forward (transformers, before)", "fused decoder, eager", "fused decoder, compiled")
    print(f"{args.shape} ({depth} layers), policy {args.policy}, {args.rows} rows: kernels per decode step")
    for i, name in enumerate(names):
        per_layer = (cb[i] - ca[i]) / (b - a)
        total = ca[i] + per_layer * (depth - a)
        print(f"  {name:38s} {per_layer:6.1f} per layer, {total:7.0f} per step")


if __name__ == "__main__":
    main()
