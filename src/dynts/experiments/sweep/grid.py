"""The grid of a sweep: its syntax, its cells (named `full` and `<policy>-B<b>-W<w>-r<r>`, each in SWEEP/cells/) and
the validated specification that expands into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynts.config import BudgetConfig, SamplingConfig, check_batch_size
from dynts.errors import DynTSError
from dynts.harness.evaluate import EvalPlan
from dynts.harness.prompts import DEFAULT_SHUFFLE_SEED
from dynts.policies import budget_for, policy_class
from dynts.policies.options import format_spec, parse_spec
from dynts.policies.registry import check_common_options, resolve_spec

CELLS_DIR = "cells"


def format_ratio(ratio: float) -> str:
    return f"{ratio:.10g}"


@dataclass(frozen=True)
class Cell:
    """One evaluation of the grid: a policy with its options and, for compressing policies, its B / W / r."""

    policy: str
    budget: int | None = None
    window: int | None = None
    ratio: float | None = None
    options: tuple[tuple[str, Any], ...] = ()  # the policy options that differ from its defaults, sorted

    @property
    def compresses(self) -> bool:
        return self.budget is not None

    @property
    def label(self) -> str:
        """The policy and its non-default options, as written in --policies: NAME or NAME:KEY=VALUE..."""
        return format_spec(self.policy, dict(self.options))

    @property
    def name(self) -> str:
        """The cell's directory name: NAME[+KEY=VALUE...][-B<b>-W<w>-r<r>]."""
        head = "+".join([self.policy, *(f"{k}={v}" for k, v in parse_spec(self.label)[1].items())])
        if not self.compresses:
            return head
        return f"{head}-B{self.budget}-W{self.window}-r{format_ratio(self.ratio)}"

    def budget_config(self) -> BudgetConfig:
        return budget_for(self.policy, self.budget, self.window, self.ratio)


@dataclass
class SweepSpec:
    """Everything `dynts sweep` needs. cells() finds the grid's mistakes; run_sweep checks the rest (datasets,
    prompts against budgets, the importance head, sweep.json) before anything is written."""

    model: str
    policies: list[str]  # NAME or NAME:KEY=VALUE... (policy options)
    budgets: list[int]
    windows: list[int]
    ratios: list[float]
    datasets: list[str]
    samples: int = 1
    limit: int | None = None
    data_dir: str | None = None
    split: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    head: str | None = None
    trace_steps: bool = True
    probe_tokens: int | None = None  # None: min(max_new_tokens, 2 x the largest budget)
    probe_batch: int | None = None  # None: 1
    skip_invalid: bool = False
    fast: bool | None = None  # the static fast decode path; None: on with CUDA
    batching: str = "continuous"
    kernel: str | None = None
    graphs: bool | None = None
    compile: bool | None = None
    shuffle_seed: int | None = None
    policy_options: dict[str, Any] = field(default_factory=dict)  # --policy-opt: for every policy that has the key
    skipped: list[str] = field(default_factory=list)  # invalid cells dropped by skip_invalid

    def __post_init__(self):
        if self.shuffle_seed is None:
            self.shuffle_seed = DEFAULT_SHUFFLE_SEED
        EvalPlan(datasets=list(self.datasets), samples=self.samples, limit=self.limit)  # same checks as eval
        check_batch_size(self.batch_size)
        if self.probe_tokens is not None and self.probe_tokens < 1:
            raise DynTSError(f"--probe-tokens must be at least 1, got {self.probe_tokens}")
        if self.probe_batch is not None and self.probe_batch < 1:
            raise DynTSError(f"--probe-batch must be at least 1, got {self.probe_batch}")
        if not self.policies:
            raise DynTSError("--policies names no policy")

    # -- grid ----------------------------------------------------------------------------------
    def cells(self) -> list[Cell]:
        """The cells of the grid; raises one DynTSError naming every invalid cell (unless skip_invalid)."""
        self.skipped = []
        cells: list[Cell] = []
        invalid: list[str] = []
        entries = [resolve_spec(text, self.policy_options) for text in self.policies]
        check_common_options(self.policy_options, [name for name, _ in entries])
        for policy, options in dict.fromkeys(entries):
            if not policy_class(policy).compresses:
                cells.append(Cell(policy, options=options))
                continue
            if not self.budgets or not self.windows or not self.ratios:
                raise DynTSError(f"policy {policy} compresses: give --budgets, --windows and --ratios")
            for budget in self.budgets:
                for window in self.windows:
                    for ratio in self.ratios:
                        cell = Cell(policy, int(budget), int(window), float(ratio), options)
                        try:
                            cell.budget_config()
                        except DynTSError as exc:
                            invalid.append(f"{cell.name}: {exc}")
                            continue
                        cells.append(cell)
        self._report_invalid(invalid, "in the grid")
        if not cells:
            raise DynTSError("the grid has no valid cell")
        return cells

    def _report_invalid(self, invalid: list[str], where: str) -> None:
        if not invalid:
            return
        if self.skip_invalid:
            self.skipped += invalid
            return
        shown = "\n  ".join(invalid[:20]) + (f"\n  ... and {len(invalid) - 20} more" if len(invalid) > 20 else "")
        raise DynTSError(
            f"{len(invalid)} invalid cell(s) {where}:\n  {shown}\n"
            "change --budgets/--windows/--ratios, or pass --skip-invalid to leave these cells out"
        )

    def resolved_probe_tokens(self, cells: list[Cell], stored: dict | None = None) -> int:
        """--probe-tokens, else what the sweep used before, else min(max_new_tokens, 2 x the largest budget)."""
        if self.probe_tokens is not None:
            return self.probe_tokens
        if stored and stored.get("probe_tokens"):
            return int(stored["probe_tokens"])
        budgets = [c.budget for c in cells if c.compresses]
        wanted = 2 * max(budgets) if budgets else self.sampling.max_new_tokens
        return min(self.sampling.max_new_tokens, wanted)

    def shared(self, cells: list[Cell], stored: dict | None = None) -> dict:
        """The flags every cell of the sweep shares (compared on a rerun) and a few informative ones.

        stored: the shared flags of an existing sweep.json, whose probe settings fill in the ones not given."""
        probe_batch = self.probe_batch or (stored or {}).get("probe_batch") or 1
        return {
            "model": self.model,
            "dtype": self.dtype,
            "sampling": self.sampling.to_dict(),
            "samples": self.samples,
            "limit": self.limit,
            "data_dir": str(Path(self.data_dir).resolve()) if self.data_dir else None,
            "split": self.split,
            "shuffle_seed": self.shuffle_seed,
            "head": str(Path(self.head).resolve()) if self.head else None,
            "trace_steps": self.trace_steps,
            "probe_tokens": self.resolved_probe_tokens(cells, stored) if self.trace_steps else None,
            "probe_batch": probe_batch if self.trace_steps else None,
            "batch_size": self.batch_size,
            "device": self.device,
        }

    def grid(self) -> dict:
        labels = [
            format_spec(name, dict(options))
            for name, options in (resolve_spec(text, self.policy_options) for text in self.policies)
        ]
        return {
            "policies": list(dict.fromkeys(labels)),
            "budgets": list(self.budgets),
            "windows": list(self.windows),
            "ratios": list(self.ratios),
            "datasets": list(self.datasets),
        }


def cell_dir(sweep_dir: str | Path, cell: Cell) -> Path:
    return Path(sweep_dir) / CELLS_DIR / cell.name
