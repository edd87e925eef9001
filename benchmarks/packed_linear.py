"""The decode projections' products on a CPU, plain weights against oneDNN-packed ones, by row count.

A decode step multiplies a few rows by every weight of the model, one after another, so what counts is how fast
each product streams its weight from memory (the weights do not stay in cache between steps). This runs the
model's own chain of decode projections (per layer: QKV merged, output, gate/up merged, down; then the LM head)
at each row count, with plain weights (F.linear) and packed ones (oneDNN's own product, and PackedWeight, which
takes the plain product at PLAIN_ROWS rows or fewer), and prints milliseconds per chain and GB/s of weights read.
These figures chose PLAIN_ROWS (fast/packed_linear.py). About a minute on the 2-core CPU.

    OMP_NUM_THREADS=2 python benchmarks/packed_linear.py [--model smollm2-135m] [--rows 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dynts.fast.fused_decoder import FusedDecoder
from dynts.fast.packed_linear import PLAIN_ROWS, PackedWeight
from dynts.models.loading import load_model


def decode_weights(loaded) -> list[torch.Tensor]:
    """Every weight a decode step multiplies by, in the order it does."""
    fused = FusedDecoder(loaded.model)
    weights = []
    for layer in fused.layers:
        weights += [layer.qkv_weight, layer.o_proj.weight, layer.gate_up_weight, layer.down_proj.weight]
    return [w.detach() for w in weights] + [loaded.model.get_output_embeddings().weight.detach()]


def chain_ms(products, inputs, repeat: int) -> float:
    for product, x in zip(products, inputs):  # one untimed pass
        product(x)
    start = time.perf_counter()
    for _ in range(repeat):
        for product, x in zip(products, inputs):
            product(x)
    return (time.perf_counter() - start) / repeat * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu", dtype="fp32")
    weights = decode_weights(loaded)
    total = sum(w.numel() * w.element_size() for w in weights)
    print(f"{len(weights)} products, {total / 1e6:.0f} MB of weights, {torch.get_num_threads()} threads")
    header = f"{'rows':>4}  {'plain ms':>9} {'GB/s':>5}  {'oneDNN ms':>9} {'GB/s':>5}"
    print(f"{header}  PackedWeight (plain at <= {PLAIN_ROWS} rows)")
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = [torch.randn(rows, w.shape[1]) for w in weights]
        packed = [PackedWeight(w, rows) for w in weights]
        plain = [lambda x, w=w: F.linear(x, w) for w in weights]
        onednn = [p.onednn for p in packed]
        times = [chain_ms(products, inputs, args.repeat) for products in (plain, onednn, packed)]
        rates = [total / t / 1e6 for t in times]
        print(
            f"{rows:>4}  {times[0]:>9.1f} {rates[0]:>5.1f}  {times[1]:>9.1f} {rates[1]:>5.1f}  "
            f"{times[2]:.1f} ms, {rates[2]:.1f} GB/s"
        )


if __name__ == "__main__":
    main()
