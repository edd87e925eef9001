"""Decode projections with their weights re-laid once in oneDNN's blocked layout (the CPU fast path's GEMMs).

A decode step multiplies a few rows (one token per sequence) by every weight of the model, so on a CPU its time is
the time to stream the weights from memory. PyTorch's default CPU GEMM does that poorly at 2-16 rows: on this
project's 2-core CPU (about 23 GB/s for a plain read), SmolLM2-135M's LM head [49152 x 576] at 8 rows ran at
7 GB/s (15 ms); packed for oneDNN once, the same product ran at 21 GB/s (5.6 ms), and the layers' projections
gained 10-40% (benchmarks/packed_linear.py prints the figures of the machine it runs on). vLLM's CPU backend
packs its weights the same way.

The cost is memory: the packed copies sit beside the model's own weights (the prefill runs the model's forward,
which reads those), so the decode weights are held twice: `PackedWeights.nbytes` says how much, and
`FastConfig(packed=False)` (env DYNTS_PACKED=0) turns it off, and by default it is not made where the copy would
take over a quarter of the free memory (`memory_problem`). Packing needs a CPU device, fp32 or bf16, and a
oneDNN build; `packing_problem` says why not, checked by running one packed product against F.linear.
The packed tensors are opaque to torch.compile's inductor (its oneDNN lowering takes only weights it folded as
constants itself), so a compiled step calls them through one custom op, `dynts::packed_linear`, that inductor
leaves as an external call: the compiled graph fuses everything between the GEMMs, the GEMMs stay oneDNN's.
The op names its weight by a registry key (an int, constant in the graph), so it is used where the whole forward
is one graph (FastEngine.compiled_forward); eagerly the weight is called directly, without the op's dispatch.
"""

from __future__ import annotations

import functools
import itertools
import os
import weakref

import torch
import torch.nn.functional as F

PACKED_DTYPES = (torch.float32, torch.bfloat16)
PACKED_ENV = "DYNTS_PACKED"
_REGISTRY: weakref.WeakValueDictionary[int, PackedWeight] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


# At this many rows or fewer, the plain weight's product (the BLAS's GEMV) streams the weight faster than oneDNN's
# packed one: on this project's 2-core CPU, SmolLM2-135M's 121 decode products at 1 / 2 rows took 21 / 22 ms plain
# against 29 / 27 ms packed, and at 4 / 8 rows 38 / 49 ms plain against 30 / 31 ms packed
# (benchmarks/packed_linear.py).
PLAIN_ROWS = 2


class PackedWeight:
    """One linear layer's weight, packed for `rows` rows; calling it gives x @ weight.T + bias for any row count
    (at PLAIN_ROWS rows or fewer through the plain weight, which it keeps a reference to: no copy)."""

    def __init__(self, weight: torch.Tensor, rows: int):
        self.out_features, self.in_features = weight.shape
        self.nbytes = weight.numel() * weight.element_size()
        self.plain = weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.plain, rows)
        self.key = next(_KEYS)
        _REGISTRY[self.key] = self

    def multiply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.numel() <= PLAIN_ROWS * self.in_features:
            return F.linear(x, self.plain, bias)
        return self.onednn(x, bias)

    def onednn(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """oneDNN's product on the packed weight, at any row count."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.dynts.packed_linear(x, self.key, self.out_features, bias)
        return self.multiply(x, bias)


@torch.library.custom_op("dynts::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, key: int, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + bias with W the registered PackedWeight `key` (what a compiled graph calls)."""
    return _REGISTRY[key].multiply(x, bias)


@packed_linear.register_fake
def _packed_linear_shape(x, key, out_features, bias):
    return x.new_empty((*x.shape[:-1], out_features))


class PackedHead(torch.nn.Module):
    """The LM head (a bias-free output projection) as a module over its packed weight: what StaticStep calls."""

    def __init__(self, weight: torch.Tensor, rows: int):
        super().__init__()
        self.weight = PackedWeight(weight, rows)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.weight(hidden)


def project(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """The fused decoder's projections: a PackedWeight's product (PackedWeight.multiply), a plain tensor's F.linear."""
    if isinstance(weight, PackedWeight):
        return weight(x, bias)
    return F.linear(x, weight, bias)


def memory_problem(model) -> str | None:
    """None when a packed copy of the model's weights takes at most a quarter of the memory free now, else why it
    is not made by default (a laptop running a 7B model should not find its weights held twice)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf here: nothing to judge by, so no copy
        return "the free memory is unknown here"
    if weights > free / 4:
        return f"a packed copy of the weights ({weights / 2**30:.1f} GiB) would take over a quarter of the free memory"
    return None


@functools.cache
def packing_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when packed projections run here (tried once per device and dtype, on a small product against
    F.linear), else why not."""
    if device.type != "cpu":
        return f"packed projections are for the CPU (device is {device.type})"
    if dtype not in PACKED_DTYPES:
        return f"packed projections take fp32 or bf16 weights, not {dtype}"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    weight = torch.linspace(-1, 1, 24 * 16, dtype=dtype).reshape(24, 16)
    x = torch.linspace(-1, 1, 3 * 16, dtype=dtype).reshape(3, 16)
    try:
        got = PackedWeight(weight, 3).onednn(x)
    except RuntimeError as exc:
        return f"oneDNN's packed linear failed here ({str(exc).splitlines()[0]})"
    if not torch.allclose(got.float(), F.linear(x, weight).float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5):
        return "oneDNN's packed linear disagrees with F.linear here"
    return None
