"""FullKV: no eviction; the cache grows with the sequence (the paper's "Transformers" baseline)."""

from dynts.policies.base import Policy


class FullPolicy(Policy):
    name = "full"
    summary = "everything: no budget, the cache grows with the sequence"
    compresses = False
    capturable = True
