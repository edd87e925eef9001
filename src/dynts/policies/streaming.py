"""StreamingLLM: the first tokens (attention sinks) plus the most recent ones, same total as Window."""

from dataclasses import dataclass

from dynts.errors import DynTSError
from dynts.policies.base import Policy, slot_index_scores
from dynts.policies.options import option_help


@dataclass(frozen=True)
class StreamingConfig:
    sinks: int = option_help("tokens at the start of the sequence (attention sinks) that are never evicted", default=10)

    def __post_init__(self):
        if self.sinks < 0:
            raise DynTSError(f"sinks must be >= 0, got {self.sinks}")


class StreamingPolicy(Policy):
    name = "streaming"
    summary = "attention sinks (the first tokens) + the newest tokens"
    Config = StreamingConfig
    capturable = True

    def __init__(self, budget, config=None):
        super().__init__(budget, config)
        self.check_budget(budget)

    def check_budget(self, budget):
        if budget.compresses and self.config.sinks > budget.selected_count(budget.budget):
            raise DynTSError(
                f"streaming: {self.config.sinks} sink tokens do not fit in the "
                f"{budget.selected_count(budget.budget)} older tokens a compression keeps"
            )

    def score_older(self, cache, row, older):
        # Sinks never move: they are kept at every compaction and slots keep original order.
        scores = slot_index_scores(older, cache.device)
        scores[: self.config.sinks].fill_(float("inf"))  # fill_, not a Python scalar copied in: no host data
        return scores
