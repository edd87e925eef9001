"""A fixed-capacity KV cache with per-sequence lengths and in-place compaction.

Each layer holds keys/values of shape [batch, kv_heads, capacity, head_dim]. Sequence b occupies slots
[0, lengths[b]) of its row; new tokens are written at its own length, so sequences of one batch can be at
different lengths and compress at different steps. Scores that policies keep per cached token live beside
the keys ("slot buffers") and move with them when a row is compacted.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class BudgetedLayer(CacheLayerMixin):
    """One decoder layer's keys and values plus the per-slot and per-row buffers policies attach to it."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: BudgetedCache, layer_idx: int):
        super().__init__()
        self.owner = weakref.proxy(owner)  # no reference cycle: a dropped cache frees its memory at once, not at gc
        self.layer_idx = layer_idx
        self.slot: dict[str, torch.Tensor] = {}  # [batch, kv_heads, capacity] each
        self.rows: dict[str, torch.Tensor] = {}  # [batch, ...] each

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        owner = self.owner
        self.dtype, self.device = key_states.dtype, key_states.device
        self.num_heads, self.head_dim = key_states.shape[1], key_states.shape[-1]
        shape = (owner.rows_allocated, self.num_heads, owner.capacity)
        self.keys = key_states.new_zeros(*shape, key_states.shape[-1])
        self.values = value_states.new_zeros(*shape, value_states.shape[-1])
        for name, (dtype, fill) in owner.layer_slot_specs.items():
            self.slot[name] = torch.full(shape, fill, dtype=dtype, device=self.device)
        for name, (tail, dtype) in owner.layer_row_specs.items():
            self.rows[name] = torch.zeros(owner.rows_allocated, *tail(self), dtype=dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.owner.plan
        if plan.prefill_row is not None:
            b, start, end = plan.prefill_row, plan.start, plan.kv_len
            self.keys[b, :, start:end] = key_states[0]
            self.values[b, :, start:end] = value_states[0]
            return self.keys[b : b + 1, :, :end], self.values[b : b + 1, :, :end]
        rows, slots = plan.row_index, plan.write_slots
        self.keys[rows, :, slots] = key_states[:, :, 0]
        self.values[rows, :, slots] = value_states[:, :, 0]
        return self.keys[:, :, : plan.kv_len], self.values[:, :, : plan.kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.plan.kv_len if self.owner.plan else query_length, 0

    def get_seq_length(self) -> int:
        return max(self.owner.lengths) if self.owner.lengths else 0

    def get_max_length(self) -> int:
        return self.owner.capacity

    # --- bookkeeping used by the engine -------------------------------------------------------
    def select_rows(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = self.keys[index], self.values[index]
        self.slot = {k: v[index] for k, v in self.slot.items()}
        self.rows = {k: v[index] for k, v in self.rows.items()}

    def add_rows(self, n: int) -> None:
        """n empty rows at the end (the owner's rows_allocated already counts them)."""
        if not self.is_initialized:
            return

        def grown(buf: torch.Tensor, fill) -> torch.Tensor:
            return torch.cat([buf, torch.full((n, *buf.shape[1:]), fill, dtype=buf.dtype, device=buf.device)])

        self.keys, self.values = grown(self.keys, 0), grown(self.values, 0)
        self.slot = {k: grown(v, self.owner.layer_slot_specs[k][1]) for k, v in self.slot.items()}
        self.rows = {k: grown(v, 0) for k, v in self.rows.items()}

    def reset_row(self, row: int) -> None:
        if not self.is_initialized:
            return
        for name, buf in self.slot.items():
            buf[row].fill_(self.owner.layer_slot_specs[name][1])
        for buf in self.rows.values():
            buf[row].zero_()

    def compact_row(self, row: int, keep: torch.Tensor) -> None:
        """Move the kept slots of one row to its front, in order. keep: [n] (all heads) or [kv_heads, n].
        Slot buffers beyond the kept tokens go back to their fill value, so a token written there later does not
        inherit the score (e.g. accumulated attention) of the token that used to occupy the slot."""
        n = keep.shape[-1]
        if keep.dim() == 1:
            self.keys[row, :, :n] = self.keys[row][:, keep]
            self.values[row, :, :n] = self.values[row][:, keep]
            for buf in self.slot.values():
                buf[row, :, :n] = buf[row][:, keep]
        else:
            idx = keep.unsqueeze(-1).expand(-1, -1, self.keys.shape[-1])
            self.keys[row, :, :n] = torch.gather(self.keys[row], 1, idx)
            self.values[row, :, :n] = torch.gather(self.values[row], 1, idx)
            for buf in self.slot.values():
                buf[row, :, :n] = torch.gather(buf[row], 1, keep)
        for name, buf in self.slot.items():
            buf[row, :, n:] = self.owner.layer_slot_specs[name][1]


class StepPlan:
    """Where the current forward writes: a run of tokens appended to one row (a prompt, or a teacher-forced chunk
    after the row's cached tokens, starting at slot `start`), or one token into every row."""

    def __init__(self, prefill_row=None, row_index=None, write_slots=None, kv_len=0, start=0):
        self.prefill_row = prefill_row
        self.start = start
        self.row_index = row_index
        self.write_slots = write_slots
        self.kv_len = kv_len


class BudgetedCache(Cache):
    """Per-layer fixed-capacity K/V with per-sequence lengths (kept as a Python list: no host syncs)."""

    def __init__(self, num_layers: int, batch_size: int, capacity: int, device: torch.device | str = "cpu"):
        self.rows_allocated = batch_size
        self.capacity = capacity
        self.device = torch.device(device)
        self.lengths: list[int] = [0] * batch_size
        self.next_position: list[int] = [0] * batch_size  # original position of each row's next token
        self.plan: StepPlan | None = None
        self._decode_rows: dict[int, torch.Tensor] = {}  # row count -> arange(rows), made once
        self.layer_slot_specs: dict[str, tuple[torch.dtype, float]] = {}
        self.layer_row_specs: dict[str, tuple] = {}
        self.slot: dict[str, torch.Tensor] = {}  # shared by all layers and heads: [batch, capacity]
        self.slot_fill: dict[str, float] = {}
        super().__init__(layers=[BudgetedLayer(self, i) for i in range(num_layers)])

    # --- buffers policies attach --------------------------------------------------------------
    def add_slot_buffer(self, name: str, *, per_head: bool, dtype=torch.float32, fill: float = 0.0) -> None:
        """A value per cached token that moves with it on compaction; per_head puts one in every layer and KV head."""
        if per_head:
            self.layer_slot_specs[name] = (dtype, fill)
        else:
            self.slot[name] = torch.full((self.rows_allocated, self.capacity), fill, dtype=dtype, device=self.device)
            self.slot_fill[name] = fill

    def add_row_buffer(self, name: str, tail, dtype=torch.float32) -> None:
        """Per-layer state of one sequence (e.g. its recent queries); tail(layer) gives the shape after batch."""
        self.layer_row_specs[name] = (tail, dtype)

    # --- planning the next forward ------------------------------------------------------------
    def plan_prefill(self, row: int, length: int) -> None:
        """Append `length` tokens to one row in one causal forward (from slot 0 for a prompt)."""
        start = self.lengths[row]
        self.plan = StepPlan(prefill_row=row, kv_len=start + length, start=start)

    def decode_rows(self, n: int) -> torch.Tensor:
        """The row index [n] of a decode step over n rows: one tensor per row count, kept for the cache's life, so a
        captured step that reads it (its K/V writes) still finds it after a refill re-planned the step."""
        rows = self._decode_rows.get(n)
        if rows is None:
            rows = self._decode_rows[n] = torch.arange(n, device=self.device)
        return rows

    def decode_kv_len(self) -> int:
        """The slots a decode step attends over: the longest row's tokens and the one it writes now."""
        return max(self.lengths) + 1

    def plan_decode(self) -> torch.Tensor | None:
        """Plan one token per row; returns the [batch, 1, 1, kv_len] validity mask (None when no row is shorter)."""
        n = len(self.lengths)
        kv_len = self.decode_kv_len()
        slots = torch.tensor(self.lengths, device=self.device)
        self.plan = StepPlan(row_index=self.decode_rows(n), write_slots=slots, kv_len=kv_len)
        if min(self.lengths) + 1 == kv_len:
            return None
        return (torch.arange(kv_len, device=self.device)[None, :] <= slots[:, None])[:, None, None, :]

    def finish_step(self, new_tokens: int = 1) -> None:
        plan = self.plan
        if plan.prefill_row is not None:
            self.lengths[plan.prefill_row] = plan.kv_len
            self.next_position[plan.prefill_row] += plan.kv_len - plan.start
        else:
            self.lengths = [n + new_tokens for n in self.lengths]
            self.next_position = [p + new_tokens for p in self.next_position]
        self.plan = None

    # --- eviction and batch shrinking ---------------------------------------------------------
    def compact_row(self, row: int, keep: torch.Tensor) -> None:
        """keep: sorted slot indices, [n] shared by all layers and heads or [layers, kv_heads, n]."""
        n = keep.shape[-1]
        for i, layer in enumerate(self.layers):
            layer.compact_row(row, keep if keep.dim() == 1 else keep[i])
        shared = keep if keep.dim() == 1 else keep[0, 0]
        for name, buf in self.slot.items():
            buf[row, :n] = buf[row, shared]
            buf[row, n:] = self.slot_fill[name]
        self.lengths[row] = n

    def reset_row(self, row: int) -> None:
        """Empty a row for the next sequence (continuous batching): no tokens, positions from 0, every per-slot and
        per-row buffer back to its fill value. Keys and values are left as they are: nothing reads beyond a row's
        length."""
        self.lengths[row] = 0
        self.next_position[row] = 0
        for name, buf in self.slot.items():
            buf[row].fill_(self.slot_fill[name])
        for layer in self.layers:
            layer.reset_row(row)

    def select_rows(self, rows: list[int]) -> None:
        """Drop finished sequences so they cost no more work."""
        index = torch.tensor(rows, device=self.device, dtype=torch.long)
        for layer in self.layers:
            layer.select_rows(index)
        self.slot = {k: v[index] for k, v in self.slot.items()}
        self.lengths = [self.lengths[r] for r in rows]
        self.next_position = [self.next_position[r] for r in rows]
        self.rows_allocated = len(rows)

    def add_rows(self, n: int) -> None:
        """Add n empty rows at the end (continuous batching: requests arrived after rows were dropped)."""
        self.rows_allocated += n
        for name, buf in self.slot.items():
            extra = torch.full((n, *buf.shape[1:]), self.slot_fill[name], dtype=buf.dtype, device=buf.device)
            self.slot[name] = torch.cat([buf, extra])
        for layer in self.layers:
            layer.add_rows(n)
        self.lengths += [0] * n
        self.next_position += [0] * n

    # --- introspection ------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths) if self.lengths else 0

    def bytes_per_token(self) -> int:
        """K and V bytes one token costs across all layers."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                total += layer.num_heads * (layer.keys.shape[-1] + layer.values.shape[-1]) * layer.keys.element_size()
        return total
