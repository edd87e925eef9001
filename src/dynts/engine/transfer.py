"""Small host data onto the device without making the host wait for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory, which waits for the stream: every kernel
queued before it must finish first. Through pinned memory and a non-blocking copy the host goes on at once (the
pinned block is kept until the copy is done by torch's host allocator). Refills into a running batch build
their prompt tensors this way, so a refill never stalls the decode steps already queued.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A 1-D tensor of `values` on `device`; on a GPU via pinned memory, so the host does not wait."""
    if device.type == "cuda":
        return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype, device=device)
