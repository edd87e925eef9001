"""The budgeted cache with one shape for every decode step, for the fast path.

BudgetedCache plans each decode step over the longest row (kv_len = max length + 1) and its lengths live on
the host. Here all layers are allocated up front, a captured or compiled step attends over the whole capacity
(masked, or limited by a length-aware kernel) while an eager one keeps the longest row's kv_len
(StaticStep.live_window), rows write at their own length held in a device tensor, and the rows that
reach the budget at the same step are compacted together with device-side gathers. The host still tracks the
lengths (each step adds one, a compaction sets W + floor(r (B - W))), so it never has to read them back.
"""

from __future__ import annotations

import torch

from dynts.kv.cache import BudgetedCache, StepPlan


class StaticBudgetedCache(BudgetedCache):
    _static_plan: StepPlan | None = None

    def preallocate(self, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        """Allocate every layer's keys, values and buffers now, instead of at the first forward."""
        probe = torch.empty(1, kv_heads, 0, head_dim, dtype=dtype, device=self.device)
        for layer in self.layers:
            layer.lazy_initialization(probe, probe)
        self._heads = torch.arange(kv_heads, device=self.device)
        # Fill values live on the device: a Python scalar written through advanced indexing is a host-to-device
        # copy (and a stream sync) on a GPU.
        fills = {
            **{n: (d, f) for n, (d, f) in self.layer_slot_specs.items()},
            **{n: (b.dtype, self.slot_fill[n]) for n, b in self.slot.items()},
        }
        self._fills = {n: torch.tensor(f, dtype=d, device=self.device) for n, (d, f) in fills.items()}

    def plan_static_decode(self, write_slots: torch.Tensor) -> None:
        """Every later decode forward writes row b at slot write_slots[b] (a device tensor the step updates in place)
        and sees the whole capacity. The plan is made once per row count and write_slots tensor, and put back after
        each prefill: a captured step goes on reading the same tensors."""
        plan = self._static_plan
        rows = self.decode_rows(self.rows_allocated)
        if plan is None or plan.row_index is not rows or plan.write_slots is not write_slots:
            plan = self._static_plan = StepPlan(row_index=rows, write_slots=write_slots, kv_len=self.capacity)
        self.plan = plan

    def plan_live_decode(self) -> int:
        """An eager step's plan: attend over decode_kv_len() slots (the host's lengths), not the whole capacity."""
        self.plan.kv_len = min(self.capacity, self.decode_kv_len())
        return self.plan.kv_len

    def advance(self) -> None:
        """Host bookkeeping for one decode step (the device lengths advance inside the step itself)."""
        self.lengths = [n + 1 for n in self.lengths]
        self.next_position = [p + 1 for p in self.next_position]

    def compact_rows(self, rows: list[int], row_index: torch.Tensor, keep: torch.Tensor) -> None:
        """Move the kept slots of several rows to their fronts at once, with no host sync.

        row_index: the rows as a device tensor [m]; keep: sorted slots [m, kept] shared by all layers and heads,
        or [m, layers, kv_heads, kept]. Same result as BudgetedCache.compact_row for each row.
        """
        kept = keep.shape[-1]
        shared = keep.dim() == 2
        r, h = row_index[:, None, None], self._heads[None, :, None]
        for i, layer in enumerate(self.layers):
            slots = keep[:, None, :] if shared else keep[:, i]  # [m, 1 or kv_heads, kept]
            layer.keys[row_index, :, :kept] = layer.keys[r, h, slots]
            layer.values[row_index, :, :kept] = layer.values[r, h, slots]
            for name, buf in layer.slot.items():
                buf[row_index, :, :kept] = buf[r, h, slots]
                buf[row_index, :, kept:] = self._fills[name]
        first = keep if shared else keep[:, 0, 0]  # shared buffers follow layer 0, head 0 (as compact_row)
        for name, buf in self.slot.items():
            buf[row_index, :kept] = buf[row_index[:, None], first]
            buf[row_index, kept:] = self._fills[name]
        for row in rows:
            self.lengths[row] = kept

    def keep_rows(self, live: list[int]) -> None:
        """Release rows in place: the live rows move to the front and every buffer becomes a view of its first
        len(live) rows, so no second copy of the cache is made. live: sorted row indices."""
        moves = [(dst, src) for dst, src in enumerate(live) if dst != src]
        n = len(live)

        def shrink(buf: torch.Tensor) -> torch.Tensor:
            if moves:
                dst = torch.tensor([d for d, _ in moves], device=self.device)
                src = torch.tensor([s for _, s in moves], device=self.device)
                buf[dst] = buf[src]
            return buf[:n]

        for layer in self.layers:
            layer.keys, layer.values = shrink(layer.keys), shrink(layer.values)
            layer.slot = {k: shrink(v) for k, v in layer.slot.items()}
            layer.rows = {k: shrink(v) for k, v in layer.rows.items()}
        self.slot = {k: shrink(v) for k, v in self.slot.items()}
        self.lengths = [self.lengths[r] for r in live]
        self.next_position = [self.next_position[r] for r in live]
        self.rows_allocated = n
