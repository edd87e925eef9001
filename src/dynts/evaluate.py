"""`dynts eval`: benchmarks -> engine -> result store -> report.

Every finished sample is appended to OUT/samples.jsonl as its batch finishes; a rerun skips what is stored.
Each sample's sampler is seeded from (seed, dataset, id, sample index), so a sample's text does not depend
on batching, on what was already done, or on how many samples were asked for.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .datasets import Problem, load_dataset
from .engine import Engine
from .errors import DynTSError
from .prompts import DEFAULT_SHUFFLE_SEED, question_text
from .report import write_report
from .store import ResultStore, build_record


def sample_seed(seed: int, problem: Problem, sample: int) -> int:
    return zlib.crc32(f"{seed}:{problem.dataset}:{problem.id}:{sample}".encode())


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@dataclass
class EvalPlan:
    datasets: list[str]
    samples: int = 5
    limit: int | None = None
    data_dir: str | None = None
    split: str | None = None
    shuffle_seed: int = DEFAULT_SHUFFLE_SEED

    def __post_init__(self):
        if self.samples < 1:
            raise DynTSError(f"--samples must be at least 1, got {self.samples}")
        if self.limit is not None and self.limit < 1:
            raise DynTSError(f"--limit must be at least 1, got {self.limit}")
        if not self.datasets:
            raise DynTSError("--datasets names no dataset")

    def load(self) -> list[Problem]:
        problems: list[Problem] = []
        for name in self.datasets:
            problems += load_dataset(name, data_dir=self.data_dir, limit=self.limit, split=self.split)
        return problems


def manifest_for(engine: Engine, plan: EvalPlan) -> dict:
    """What defines the results of a run; a resume must match it (see store.py for the fields that may differ)."""
    policy = engine.policy
    head = getattr(policy, "head", None)
    head_info = None
    if head is not None:
        head_info = {"hidden": list(head.config.layers), "base_model": head.config.base_model,
                     "digest": hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes()
                                                       for p in head.parameters())).hexdigest()[:16]}
    budget = engine.budget
    return {
        "model": engine.loaded.name,
        "policy": {"name": policy.name, "registry_name": engine.policy_name, "budget": budget.budget,
                   "window": budget.window if budget.compresses else None,
                   "ratio": budget.ratio if budget.compresses else None},
        "head": head_info,
        "sampling": engine.sampling.to_dict(),
        "seed": engine.sampling.seed,
        "shuffle_seed": plan.shuffle_seed,
        "dtype": str(engine.loaded.dtype).replace("torch.", ""),
        "datasets": plan.datasets,
        "split": plan.split,
        "samples": plan.samples,
        "limit": plan.limit,
        "data_dir": str(Path(plan.data_dir).resolve()) if plan.data_dir else None,
        "data_source": "local" if plan.data_dir else "env-or-hub",
        "batch_size": engine.batch_size,
        "device": str(engine.device),
        "package_version": __version__,
    }


def run_eval(engine: Engine, plan: EvalPlan, out_dir: str | Path, progress: bool = True,
             extra_manifest: dict | None = None) -> dict:
    """Run (or resume) an evaluation into out_dir and return the metrics."""
    from tqdm import tqdm

    problems = plan.load()
    prompt_ids = {(p.dataset, p.id): engine.encode(question_text(p, plan.shuffle_seed)) for p in problems}
    engine.check_prompts(list(prompt_ids.values()))  # bad budgets fail before anything is written
    store = ResultStore(out_dir, {**manifest_for(engine, plan), **(extra_manifest or {})})
    try:
        done = store.done_keys()
        todo = [(p, s) for p in problems for s in range(plan.samples) if (p.dataset, p.id, s) not in done]
        wanted = {(p.dataset, p.id, s) for p in problems for s in range(plan.samples)}
        finished = [r for r in store.records() if (r["dataset"], r["id"], r["sample"]) in wanted]
        correct = sum(bool(r["correct"]) for r in finished)
        bar = tqdm(total=len(problems) * plan.samples, initial=len(finished), unit="sample", desc="eval",
                   disable=not progress or None, dynamic_ncols=True)
        live = {"tokens": 0, "time": 0.0}

        def on_result(i: int, result) -> None:
            nonlocal correct
            problem, sample = todo[i]
            record = build_record(problem, sample, result.text, result.stats.to_dict(), shuffle_seed=plan.shuffle_seed)
            record["token_ids"] = result.token_ids
            record["prompt_ids"] = prompt_ids[problem.dataset, problem.id]
            store.append(record)
            correct += bool(record["correct"])
            live["tokens"] += result.stats.generated_tokens
            live["time"] += result.stats.time_share_s
            bar.update(1)
            tps = live["tokens"] / live["time"] if live["time"] else 0.0
            bar.set_postfix(acc=f"{correct / max(bar.n, 1):.3f}", tps=f"{tps:.1f}")

        if todo:
            prompts = [prompt_ids[p.dataset, p.id] for p, _ in todo]
            seeds = [sample_seed(engine.sampling.seed, p, s) for p, s in todo]
            engine.generate(prompts, seeds=seeds, on_result=on_result)
        bar.close()
    finally:
        store.close()
    return write_report(out_dir)
