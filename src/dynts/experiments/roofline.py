"""The memory-bandwidth bound of decoding: what a decode step must read, and the throughput that allows.

A decode step reads every weight once (for the whole batch) and every cached token of every row once, so
    bytes per step = weight bytes + batch x (mean cached tokens per row) x (KV bytes per token)
and TPS <= batch x bandwidth / bytes per step. Under a budget the cached length follows a fixed schedule
(grow by one per step, drop to W + floor(r (B - W)) at B), so its mean over a run is known in advance.
The issue's own figures take every row at the full budget B instead (a slightly lower bound); both are given.
Weight bytes count every parameter a step streams once (a tied LM head once). The input embedding table is not
streamed: a step gathers only the batch's rows of it, so those rows are counted instead (an untied table of a large
vocabulary, e.g. 1.09 GB at R1-Qwen-7B, would make the bound some 6 % too kind).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from dynts.config import BudgetConfig


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """K and V of one token over all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters, each shared tensor once (parameters() already skips tied duplicates)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def streamed_weight_bytes(model: torch.nn.Module, batch: int) -> int:
    """Weight bytes one decode step of `batch` rows reads: every parameter once, but of an input embedding table
    not shared with the LM head only the batch's rows (one token per row)."""
    total = parameter_bytes(model)
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is not None and output.weight is embedding:
        return total  # tied: the LM head streams the whole table
    row = embedding.shape[-1] * embedding.element_size()
    return total - embedding.numel() * embedding.element_size() + min(batch, embedding.shape[0]) * row


def cached_tokens_per_step(prompt_len: int, new_tokens: int, budget: BudgetConfig) -> list[int]:
    """Tokens each decode step attends to (its own included): new_tokens - 1 steps, the first token comes from
    the prefill."""
    length, schedule = prompt_len, []
    for _ in range(new_tokens - 1):
        length += 1
        schedule.append(length)
        if budget.compresses and length >= budget.budget:
            length = budget.kept_after_compression(length)
    return schedule


@dataclass
class Roofline:
    weight_bytes: int  # streamed weights (+ the importance head, read every step when a policy uses one)
    kv_bytes_per_token: int
    batch: int
    mean_cached_tokens: float  # per row, over the run's schedule
    max_cached_tokens: int  # B under a budget, else the longest sequence
    bandwidth_gbps: float

    @property
    def bytes_per_step(self) -> float:
        return self.weight_bytes + self.batch * self.mean_cached_tokens * self.kv_bytes_per_token

    @property
    def tps_bound(self) -> float:
        return self.batch * self.bandwidth_gbps * 1e9 / self.bytes_per_step

    @property
    def tps_bound_at_max(self) -> float:
        """The bound with every row holding max_cached_tokens (the issue's convention)."""
        return (
            self.batch
            * self.bandwidth_gbps
            * 1e9
            / (self.weight_bytes + self.batch * self.max_cached_tokens * self.kv_bytes_per_token)
        )

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "bytes_per_step": self.bytes_per_step,
            "tps_bound": self.tps_bound,
            "tps_bound_at_max": self.tps_bound_at_max,
        }


def roofline(
    weight_bytes: int,
    kv_per_token: int,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    budget: BudgetConfig,
    bandwidth_gbps: float,
) -> Roofline:
    schedule = cached_tokens_per_step(prompt_len, new_tokens, budget) or [prompt_len]
    return Roofline(weight_bytes, kv_per_token, batch, sum(schedule) / len(schedule), max(schedule), bandwidth_gbps)


def measure_bandwidth(device: torch.device, megabytes: int | None = None, repeats: int = 10) -> float:
    """Device memory bandwidth in GB/s from timed large copies (each copy reads and writes its size)."""
    cuda = device.type == "cuda"
    size = (megabytes or (1024 if cuda else 128)) * 2**20
    src = torch.empty(size // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    if cuda:
        with torch.cuda.device(device):  # the events and copies on this device's stream, whichever is current
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
        del src, dst
        torch.cuda.empty_cache()  # the 2 GiB go back before anything sizes itself by the free memory
    else:
        begin = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        seconds = time.perf_counter() - begin
    return 2 * size * repeats / seconds / 1e9
