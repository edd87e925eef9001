"""DynTS: keep the thinking tokens a learned importance head predicts the final answer will attend to.

Every generated token is scored by the head at its decode step; prompt tokens and tokens after the
end-of-thinking marker score +inf and are never evicted. One index set is shared by all layers and heads.

The paper's ablations, as its reference code runs them: `protect_prompt=false` (dynts-noquestion) scores the
prompt 0, below any score of the head (a Softplus), so prompt tokens compete and are evicted first; `random` and
`bottom` selection ignore protection: random draws k of all older tokens alike, bottom keeps the k lowest
scores, where the +inf of prompt and answer tokens ranks last (they go first); window 0 (no local window).
`keep_protected=true` is this package's earlier variant of random / bottom: protected tokens survive them as they
survive top, so only the thinking tokens are chosen at random or from the bottom (head against chance at equal
protection).

`scores=oracle` is a diagnosis, not a deployable policy: a teacher-forced trace's answer-attention labels are known
before it is replayed (predictor/labels.py), so the benchmark hands them over with `set_oracle` and DynTS ranks by
the truth instead of the head. Whatever it still loses to a rival is the selection frame's (band, protection, r),
not the head's.

`head=PATH` gives one policy its own head checkpoint, so that a benchmark compares two heads in one run
(`--policies dynts,dynts:head=heads/mixed`): the other dynts policies keep the run's head (`--head`, else the shipped
one).
"""

from dataclasses import dataclass

import torch

from dynts.errors import DynTSError
from dynts.models.importance_head import resolve_head
from dynts.policies.base import Policy
from dynts.policies.options import option_help

SELECTIONS = ("top", "random", "bottom")
SCORES = ("head", "oracle")


@dataclass(frozen=True)
class DynTSConfig:
    selection: str = option_help(
        "which older tokens survive: top (by the head), random or bottom (the ablations)", default="top"
    )
    protect_prompt: bool = option_help(
        "the prompt is never evicted (false: the no-question ablation, prompt tokens scored 0)", default=True
    )
    keep_protected: bool = option_help(
        "random / bottom only: prompt and answer tokens still always survive (false: the paper's ablations, "
        "which ignore protection)",
        default=False,
    )
    recency: float = option_help(
        "top only: weight of recency in the ranking, 0 to 1: each older thinking token ranks by (1 - w) x its "
        "head-score rank + w x its position rank among the candidates (0: the paper's head-only ranking)",
        default=0.0,
    )
    scores: str = option_help(
        "what ranks the thinking tokens: head (the importance head) or oracle (a teacher-forced trace's true "
        "answer-attention labels, set per trace by the fidelity benchmark: a diagnosis)",
        default="head",
    )
    head: str | None = option_help(
        "checkpoint directory of the importance head this policy ranks with (default: the run's --head, else the "
        "model's shipped head)",
        default=None,
    )

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise DynTSError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if not isinstance(self.recency, (int, float)) or isinstance(self.recency, bool) or not 0 <= self.recency <= 1:
            raise DynTSError(f"recency must be a weight in [0, 1], got {self.recency!r}")
        if self.recency and self.selection != "top":
            raise DynTSError("recency blends the head's ranking: it needs selection=top")
        if self.scores not in SCORES:
            raise DynTSError(f"scores must be one of {', '.join(SCORES)}, got {self.scores!r}")
        if self.head is not None and self.scores == "oracle":
            raise DynTSError("head ranks the thinking tokens only with scores=head (oracle ranks by labels)")


class DynTSPolicy(Policy):
    name = "dynts"
    summary = "the prompt, the answer after </think>, and the top thinking tokens by the importance head"
    Config = DynTSConfig
    allows_zero_window = True
    uses_head = True
    capturable = True

    def __init__(self, budget, config=None, head=None, head_path=None, seed=0):
        super().__init__(budget, config)
        if self.config.head is not None:  # this policy's own head, in place of the run's
            head, head_path = None, self.config.head
        self.head = head
        self.head_path = head_path  # checkpoint; None: the head shipped for the model, if any
        self.seed = seed  # the random ablation's
        # Budget check (the prompt must fit in what a compression keeps) only where the prompt always survives.
        config = self.config
        self.protects_prompt = config.protect_prompt and (config.selection == "top" or config.keep_protected)
        self.oracle: torch.Tensor | None = None  # scores=oracle: the label of each original position

    def set_oracle(self, labels) -> None:
        """scores=oracle: the true label of every position of the trace about to be replayed (prompt included)."""
        if self.config.scores != "oracle":
            raise DynTSError("set_oracle needs dynts:scores=oracle")
        self.oracle = torch.as_tensor(labels, dtype=torch.float32)

    @classmethod
    def create(cls, budget, config, head=None, head_path=None, seed=0, **_):
        return cls(budget, config, head=head, head_path=head_path, seed=seed)

    def bind(self, loaded):
        if self.config.scores == "oracle":
            return  # ranks by labels: no head
        if self.head is None:
            self.head = resolve_head(self.head_path, loaded)
        if self.head.config.hidden_size != loaded.hidden_size:
            raise DynTSError(
                f"importance head expects hidden size {self.head.config.hidden_size}, "
                f"model {loaded.name} has {loaded.hidden_size}"
            )
        self.head = self.head.to(loaded.device)

    def setup(self, cache):
        cache.add_slot_buffer("importance", per_head=False, dtype=torch.float32, fill=0.0)

    @torch.no_grad()
    def on_tokens(self, cache, batch):
        if batch.is_prompt:  # +inf (protected), or 0 for the no-question ablation: the head is not asked
            value = float("inf") if self.protects_prompt else 0.0
            scores = torch.full(batch.token_ids.shape, value, device=batch.hidden.device)
        elif self.config.scores == "oracle":
            if self.oracle is None:
                raise DynTSError("dynts:scores=oracle ranks by a trace's labels: call set_oracle before replaying it")
            if int(batch.positions.max()) >= self.oracle.numel():
                raise DynTSError("dynts:scores=oracle: a token lies past the labelled trace (set_oracle of another)")
            scores = self.oracle.to(batch.hidden.device)[batch.positions].masked_fill(batch.in_answer, float("inf"))
        else:
            scores = self.head(batch.hidden).float().masked_fill(batch.in_answer, float("inf"))  # [n, q]
        cache.slot["importance"][batch.rows[:, None], batch.slots] = scores

    def score_older(self, cache, row, older):
        scores = cache.slot["importance"][row, :older].clone()
        if self.config.selection == "top":
            return blend_recency(scores, self.config.recency) if self.config.recency else scores
        protected = torch.isposinf(scores)
        if self.config.selection == "random":
            # Seeded by the sequence's own progress, not a generator shared by the batch: a sequence draws the same
            # selection whether it is decoded alone or next to others.
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + cache.next_position[row])
            chosen = torch.rand(older, generator=generator).to(scores.device)
        else:
            chosen = -scores  # the lowest scores rank first; a protected +inf becomes -inf and goes first
        return chosen.masked_fill(protected, float("inf")) if self.config.keep_protected else chosen


def blend_recency(scores: torch.Tensor, weight: float) -> torch.Tensor:
    """Unprotected slots re-scored (1 - weight) x head rank + weight x position rank, both in [0, 1] among them;
    protected (+inf) slots stay +inf. Slots hold tokens in their original order, so a slot's position rank is its
    count of unprotected slots before it. Ranks, not scores: a head's scale moves with trace length and style
    (labels are mean attentions, about 1/L), a rank does not. No host reads (shapes are fixed)."""
    protected = torch.isposinf(scores)
    free = (~protected).float()
    count = (free.sum() - 1).clamp_min(1.0)
    ranked = torch.where(protected, torch.full_like(scores, float("-inf")), scores)
    head_rank = torch.argsort(torch.argsort(ranked, stable=True)).float() - protected.float().sum()
    position_rank = torch.cumsum(free, 0) - 1
    blended = (1.0 - weight) * head_rank / count + weight * position_rank / count
    return torch.where(protected, scores, blended)
