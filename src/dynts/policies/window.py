"""Window: keep only the most recent W + floor(r (B - W)) tokens."""

from dynts.policies.base import Policy, slot_index_scores


class WindowPolicy(Policy):
    name = "window"
    summary = "the newest W + floor(r (L - W)) tokens"
    capturable = True

    def score_older(self, cache, row, older):
        return slot_index_scores(older, cache.device)
