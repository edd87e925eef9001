"""`dynts fidelity`: how far a policy's next-token distribution drifts from the full cache's, without Pass@1.

Reference traces (stored by `dynts collect`, or generated here with the full cache) are replayed teacher-forced:
the engine feeds exactly the trace's tokens while the policy evicts as it would in generation. At every position
we compare the policy's next-token distribution with the full-cache one: KL(full || policy) and whether the top-1
tokens agree. Figures are averaged over the answer span and over all positions after a sequence's first
compression (positions before it are identical to the full cache by construction).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dynts.config import SamplingConfig
from dynts.engine.engine import Engine
from dynts.engine.replay import replay
from dynts.errors import DynTSError
from dynts.harness.datasets import load_dataset
from dynts.harness.prompts import question_text
from dynts.harness.store import MANIFEST_FILE, read_manifest, read_records
from dynts.harness.tables import fixed, render_table
from dynts.models.loading import LoadedModel
from dynts.policies import budget_for, policy_class, policy_config
from dynts.policies.options import as_dict, format_spec, parse_spec
from dynts.policies.registry import check_common_options, resolve_spec
from dynts.predictor.labels import find_spans, think_start_ids


@dataclass
class Trace:
    prompt_ids: list[int]
    token_ids: list[int]
    answer_start: int | None  # index into token_ids where the answer span starts, None if it has none


@dataclass
class FidelityRecord:
    policy: str
    options: dict  # the policy options that differ from its defaults
    scope: str | None  # per-head or shared for the baselines that have the option (options.py), else None
    budget: int | None
    window: int | None
    ratio: float | None
    traces: int
    kl_answer: float | None = None
    kl_after: float | None = None
    top1_answer: float | None = None
    top1_after: float | None = None
    kl_all: float = 0.0
    top1_all: float = 0.0
    positions_answer: int = 0
    positions_after: int = 0
    positions_all: int = 0
    compressions: int = 0


@dataclass
class _Sums:
    kl: float = 0.0
    agree: float = 0.0
    count: int = 0

    def add(self, kl: torch.Tensor, agree: torch.Tensor) -> None:
        self.kl += float(kl.sum())
        self.agree += float(agree.sum())
        self.count += int(kl.numel())

    def means(self) -> tuple[float | None, float | None]:
        return (self.kl / self.count, self.agree / self.count) if self.count else (None, None)


def scope_of(policy: str, options: dict) -> str | None:
    """The scope a policy ran with: its `scope` option (given or default); for a policy without one, "per-head"
    where it ranks per layer and KV head, else None (one index set for all: nothing to scope)."""
    config = as_dict(policy_config(policy, options))
    if "scope" in config:
        return config["scope"]
    return "per-head" if policy_class(policy).per_head else None


def traces_from_store(directory: str | Path, loaded: LoadedModel, limit: int | None = None) -> list[Trace]:
    directory = Path(directory)
    if not (directory / MANIFEST_FILE).is_file():
        raise DynTSError(f"--traces {directory} is not a trace directory written by `dynts collect`")
    model = read_manifest(directory).get("model")
    if model != loaded.name:
        raise DynTSError(f"traces in {directory} come from model {model!r}, not {loaded.name!r}")
    records = [r for r in read_records(directory) if r.get("prompt_ids") and r.get("token_ids")]
    if limit:
        records = records[:limit]
    if not records:
        raise DynTSError(f"{directory} holds no traces with token ids")
    return [make_trace(loaded, r["prompt_ids"], r["token_ids"]) for r in records]


def make_trace(loaded: LoadedModel, prompt_ids: list[int], token_ids: list[int]) -> Trace:
    spans = find_spans(
        list(prompt_ids) + list(token_ids),
        len(prompt_ids),
        loaded.tokenizer,
        loaded.think_end_ids,
        think_start_ids(loaded),
    )
    return Trace(list(prompt_ids), list(token_ids), None if spans is None else spans.answer_start - len(prompt_ids))


def traces_from_dataset(
    loaded: LoadedModel,
    dataset: str,
    limit: int,
    max_new_tokens: int,
    data_dir=None,
    batch_size: int = 8,
    progress: bool = True,
    engines: dict[tuple, Engine] | None = None,
) -> list[Trace]:
    """Reference traces generated here with the full cache, greedily. With `engines`, every prompt is checked
    against their budgets before anything is generated."""
    problems = load_dataset(dataset, data_dir=data_dir, limit=limit)
    engine = Engine(loaded, "full", None, SamplingConfig(greedy=True, max_new_tokens=max_new_tokens), batch_size)
    prompts = [engine.encode(question_text(p)) for p in problems]
    for policy_engine in (engines or {}).values():
        policy_engine.check_prompts(prompts)
    bar = tqdm(total=len(prompts), unit="trace", desc="reference traces", disable=not progress or None)
    output = engine.generate(prompts, on_result=lambda i, r: bar.update(1))
    bar.close()
    return [make_trace(loaded, p, r.token_ids) for p, r in zip(prompts, output.results)]


def build_engines(
    loaded: LoadedModel,
    policies: list[str],
    budgets: list[int],
    window: int,
    ratio: float,
    head=None,
    head_path: str | None = None,
    policy_options: dict | None = None,
) -> dict[tuple, Engine]:
    """One greedy engine per (policy, budget config), keyed (label, config); policies that never compress get one,
    with config None. policies: NAME or NAME:KEY=VALUE... (the label keeps the options that differ from the
    policy's defaults); policy_options (--policy-opt) apply to every policy that has the option."""
    greedy = SamplingConfig(greedy=True, max_new_tokens=1)
    engines = {}
    entries = [resolve_spec(text, policy_options) for text in policies]
    check_common_options(policy_options or {}, [name for name, _ in entries])
    for name, options in dict.fromkeys(entries):
        label = format_spec(name, dict(options))
        configs = [budget_for(name, b, window, ratio) for b in budgets] if policy_class(name).compresses else [None]
        for config in configs:
            engines[label, config] = Engine(
                loaded, name, config, greedy, batch_size=1, head=head, head_path=head_path, policy_options=dict(options)
            )
    return engines


def fitting(engines: dict[tuple, Engine], traces: list[Trace]) -> list[Trace]:
    """The traces whose prompts every engine can replay (a prompt must fit under each budget with its window)."""

    def fits(trace):
        try:
            for engine in engines.values():
                engine.check_prompts([trace.prompt_ids])
        except DynTSError:
            return False
        return True

    return [t for t in traces if fits(t)]


def check_traces(engines: dict[tuple, Engine], traces: list[Trace]) -> None:
    """Raise before any work when a trace's prompt does not fit some engine's budget."""
    for engine in engines.values():
        engine.check_prompts([t.prompt_ids for t in traces])


def measure_engines(
    loaded: LoadedModel,
    traces: list[Trace],
    engines: dict[tuple, Engine],
    progress: bool = True,
    max_chunk: int = 512,
    share_prefix: bool = True,
    on_positions=None,
) -> list[dict]:
    """Every trace is replayed once with the full cache for the reference distributions, then once per engine in
    chunks (see replay.py): the evictions are those of generation, the forwards a few per compression.

    share_prefix: a policy's cache equals the full one until its first compression, so the reference replay's
    runs up to each budget are recorded and admitted by the policies instead of recomputed; those positions count
    with KL 0 and agreement 1, which is what computing them gives (a test checks both ways agree).

    on_positions(trace index, engine key, first, kl, compressions): every computed run of per-position KL
    (token_ids[first : first + len(kl)]) with the compressions before it, for figures per position
    (experiments/long_regime.py); the shared prefix is not reported (its KL is 0).
    """
    reference_engine = Engine(loaded, "full", None, SamplingConfig(greedy=True, max_new_tokens=1), batch_size=1)
    budgets = sorted({config.budget for _, config in engines if config is not None})

    sums = {key: {"answer": _Sums(), "after": _Sums(), "all": _Sums()} for key in engines}
    compressions = {key: 0 for key in engines}
    bar = tqdm(total=len(traces) * len(engines), unit="replay", desc="fidelity", disable=not progress or None)
    for index, trace in enumerate(traces):
        prompt_len, length, answer = len(trace.prompt_ids), len(trace.token_ids), trace.answer_start
        reference = torch.empty(length, loaded.model.config.vocab_size)

        def keep_reference(first, logits, _compressions, reference=reference):
            reference[first : first + len(logits)] = logits.float().log_softmax(dim=-1).cpu()

        recorded = replay(
            reference_engine,
            trace.prompt_ids,
            trace.token_ids,
            keep_reference,
            max_chunk=max_chunk,
            stops=[b - prompt_len for b in budgets] if share_prefix else (),
            record_until=max(budgets, default=0) if share_prefix else 0,
        ).runs
        for key, engine in engines.items():
            cell = sums[key]

            def add(first, kl, agree, compressed, cell=cell, answer=answer):
                cell["all"].add(kl, agree)
                if compressed:
                    cell["after"].add(kl, agree)
                if answer is not None and first + len(kl) > answer:
                    skip = max(0, answer - first)
                    cell["answer"].add(kl[skip:], agree[skip:])

            def compare(first, logits, done, reference=reference, add=add, key=key, index=index):
                logq = logits.float().log_softmax(dim=-1).cpu()
                logp = reference[first : first + len(logq)]
                kl = (logp.exp() * (logp - logq)).sum(dim=-1).clamp_min(0.0)
                add(first, kl, (logp.argmax(dim=-1) == logq.argmax(dim=-1)).float(), done > 0)
                if on_positions is not None:
                    on_positions(index, key, first, kl, done)

            config = key[1]
            if share_prefix and config is None:  # never evicts: this is the reference replay itself
                add(0, torch.zeros(length), torch.ones(length), False)
            elif share_prefix:
                prefix, held = [], 0
                for run in recorded:
                    held += len(run.token_ids)
                    if held > config.budget:
                        break
                    prefix.append(run)
                stats = replay(engine, trace.prompt_ids, trace.token_ids, compare, max_chunk=max_chunk, prefix=prefix)
                shared = min(stats.shared + 1, length)
                add(0, torch.zeros(shared), torch.ones(shared), False)
                compressions[key] += stats.compressions
            else:
                compressions[key] += replay(
                    engine, trace.prompt_ids, trace.token_ids, compare, max_chunk=max_chunk
                ).compressions
            bar.update(1)
    bar.close()

    records = []
    for (label, config), cell in sums.items():
        name, options = parse_spec(label)
        kl_answer, top1_answer = cell["answer"].means()
        kl_after, top1_after = cell["after"].means()
        kl_all, top1_all = cell["all"].means()
        compressing = config is not None
        records.append(
            asdict(
                FidelityRecord(
                    policy=name,
                    options=options,
                    scope=scope_of(name, options),
                    budget=config.budget if compressing else None,
                    window=config.window if compressing else None,
                    ratio=config.ratio if compressing else None,
                    traces=len(traces),
                    kl_answer=kl_answer,
                    kl_after=kl_after,
                    top1_answer=top1_answer,
                    top1_after=top1_after,
                    kl_all=kl_all or 0.0,
                    top1_all=top1_all or 0.0,
                    positions_answer=cell["answer"].count,
                    positions_after=cell["after"].count,
                    positions_all=cell["all"].count,
                    compressions=compressions[label, config],
                )
            )
        )
    return records


def format_table(records: list[dict], with_scope: bool = False) -> str:
    """One row per record: policy (with its options), [scope,] budget, KL and top-1 agreement, compressions."""
    headers = ["policy", *(["scope"] if with_scope else []), "B", "KL answer", "KL after", "top1 ans", "top1 after"]
    rows = [
        [
            format_spec(r["policy"], r.get("options") or {}),
            *([r.get("scope") or "-"] if with_scope else []),
            str(r["budget"] or "-"),
            fixed(r["kl_answer"], 4),
            fixed(r["kl_after"], 4),
            fixed(r["top1_answer"], 3),
            fixed(r["top1_after"], 3),
            str(r["compressions"]),
        ]
        for r in records
    ]
    return render_table([*headers, "compr"], rows)


def plot_kl(records: list[dict], out_dir: Path) -> list[Path]:
    """KL(full || policy) after the first compression against budget, one line per policy (+ sidecar CSV)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        {**r, "policy": format_spec(r["policy"], r.get("options") or {})}
        for r in records
        if r["budget"] is not None and r["kl_after"] is not None
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = sorted((r["budget"], r["kl_after"]) for r in rows if r["policy"] == policy)
        ax.plot([b for b, _ in mine], [k for _, k in mine], marker="o", label=policy)
    ax.set_xlabel("KV budget B (tokens)")
    ax.set_ylabel("mean KL(full || policy) after 1st compression")
    ax.set_yscale("log") if rows and min(r["kl_after"] for r in rows) > 0 else None
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths = [out_dir / "fidelity_kl.png", out_dir / "fidelity_kl.pdf"]
    for path in paths:
        fig.savefig(path)
    plt.close(fig)
    with open(out_dir / "fidelity_kl.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["policy", "budget", "kl_after"])
        for r in rows:
            writer.writerow([r["policy"], r["budget"], r["kl_after"]])
    return paths


def write_outputs(records: list[dict], out_dir: str | Path, manifest: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fidelity.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=2) + "\n")
    tmp.replace(path)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "fidelity.md").write_text("```\n" + format_table(records) + "\n```\n")
    try:
        plot_kl(records, out)
    except ImportError:
        pass
    return path
