"""A debugging guard that turns host syncs inside a block into errors, on any device.

A captured CUDA graph can't contain an op whose result the host must read (`.item()`, `bool(tensor)`,
`nonzero`, ...) nor a tensor built from Python data; in an uncaptured steady state such ops stall the GPU
pipeline. On CUDA, torch's sync debug mode catches device-to-host copies; this guard also catches the ops that
would sync on a GPU while running on a CPU, so the tests can check the fast path without a GPU.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose output the host must wait for (values or a data-dependent shape).
SYNCING_OPS = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten._unique2.default,
}
# A tensor made from Python data (torch.tensor(list)): a host-to-device copy from pageable memory on a GPU.
HOST_DATA_OPS = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


class HostSyncError(RuntimeError):
    pass


class HostSyncGuard(TorchDispatchMode):
    """Raise HostSyncError on any op in SYNCING_OPS (and HOST_DATA_OPS unless allow_host_data) inside the block."""

    def __init__(self, where: str, allow_host_data: bool = False):
        super().__init__()
        self.where = where
        self.forbidden = SYNCING_OPS if allow_host_data else SYNCING_OPS | HOST_DATA_OPS
        self._cuda_mode = None

    def __enter__(self):
        if torch.cuda.is_available():
            self._cuda_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
        return super().__enter__()

    def __exit__(self, *exc):
        if self._cuda_mode is not None:
            torch.cuda.set_sync_debug_mode(self._cuda_mode)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.forbidden:
            raise HostSyncError(f"host sync in {self.where}: {func}")
        return func(*args, **(kwargs or {}))
