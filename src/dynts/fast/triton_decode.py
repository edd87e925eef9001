"""Split-K decode attention in Triton: one query per sequence over its own cached length, nothing padded.

Each program handles one (sequence, KV head, split of the capacity): it loads the group's query heads once,
streams only the keys and values below that sequence's length, and writes a partial output with its
log-sum-exp. Splits past a sequence's length do no memory reads at all, so a step costs what the sequences
hold, not batch x capacity. A few torch ops merge the partials. Shapes are static (the split count depends on
batch and capacity only), so the kernel can be captured in a CUDA graph.

Runs on CUDA; on a CPU only under Triton's interpreter (TRITON_INTERPRET=1), which the tests use.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the portable SDPA path needs none of this
    triton = None


def available() -> bool:
    return triton is not None


def interpreted() -> bool:
    """Triton's interpreter runs kernels on the CPU (slowly): for tests without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _partial_kernel(
        Q,
        K,
        V,
        Lens,
        Out,
        Lse,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_ob,
        stride_oh,
        stride_os,
        stride_lb,
        stride_lh,
        num_kv_heads,
        split_len,
        scale,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // num_kv_heads
        kh = pid % num_kv_heads
        length = tl.load(Lens + b).to(tl.int32)
        start = split * split_len
        end = tl.minimum(start + split_len, length)

        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HEAD_DIM)
        heads = kh * GROUP + g
        in_group = g < GROUP
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=in_group[:, None], other=0.0)

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
        k_base = K + b * stride_kb + kh * stride_kh
        v_base = V + b * stride_vb + kh * stride_vh
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            valid = n < end
            k = tl.load(k_base + n[:, None] * stride_kn + d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(valid[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * stride_vn + d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        has_keys = l_i > 0
        out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(
            Out + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :],
            out,
            mask=in_group[:, None],
        )
        tl.store(Lse + b * stride_lb + heads * stride_lh + split, lse, mask=in_group)


BLOCK_N = 64
MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost outweighs the parallelism it adds


def split_count(batch: int, kv_heads: int, capacity: int, device: torch.device) -> int:
    """Enough splits to give every SM a few programs, never splits shorter than MIN_SPLIT_TOKENS."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    wanted = math.ceil(4 * sms / max(1, batch * kv_heads))
    return max(1, min(wanted, math.ceil(capacity / MIN_SPLIT_TOKENS)))


def split_k_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_lengths: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """query [b, H, d]; key/value [b, kvh, capacity, d] (last dim contiguous); kv_lengths [b] -> out [b, H, d].

    Row b attends to its first kv_lengths[b] (>= 1) slots only.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    b, num_heads, head_dim = query.shape
    kv_heads, capacity = key.shape[1], key.shape[2]
    group = num_heads // kv_heads
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"split-K decode needs a power-of-two head_dim >= 16, got {head_dim}")
    splits = num_splits or split_count(b, kv_heads, capacity, query.device)
    split_len = math.ceil(math.ceil(capacity / splits) / BLOCK_N) * BLOCK_N
    partial = torch.empty(b, num_heads, splits, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(b, num_heads, splits, dtype=torch.float32, device=query.device)
    _partial_kernel[(b * kv_heads, splits)](
        query,
        key,
        value,
        kv_lengths,
        partial,
        lse,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        key.stride(2),
        value.stride(0),
        value.stride(1),
        value.stride(2),
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        lse.stride(0),
        lse.stride(1),
        kv_heads,
        split_len,
        scale,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=BLOCK_N,
        HEAD_DIM=head_dim,
        IEEE=query.dtype == torch.float32,
    )
    weights = torch.softmax(lse, dim=-1)  # splits without keys have lse -inf: weight 0
    return (weights.unsqueeze(-1) * partial).sum(dim=2).to(query.dtype)
