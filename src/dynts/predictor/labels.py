"""`dynts label`: per-token importance labels from how much the final answer attends to each thinking token.

For each kept trace the frozen model runs once over prompt + generated tokens. At every layer the attention
function hands the queries and keys to an `AnswerAttention` observer, which computes attention rows for the
answer queries only (in chunks, never the full L x L map), zeroes each query's attention to itself, and adds
the rows up. label[j] = mean over layers, query heads and answer queries of the attention paid to token j.

In the same forward it computes the attention reference `dynts train` compares heads with: the attention each
thinking token has received from the later thinking queries by the time the answer starts (H2O's accumulated
score at a selection made then). It costs the thinking rows of the attention map, again in chunks, and is stored
beside the labels in the shards ("reference").

Answer span: after the last end-of-thinking marker (`</think>`) when the model has one. Otherwise (a model
without think markers, such as the embedded one) the answer is the final sentence of the response that holds
its last `\\boxed{...}`, or the final sentence when there is no box; everything generated before it counts as
thinking. A trace without an answer span, or without thinking tokens, is skipped.

The label set lives in TRACE_DIR/labels/ (index.json and safetensors shards); this module writes it and reads it
back (`load_label_set`, for `dynts train`), so its layout is known in one place.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from dynts.errors import DynTSError
from dynts.harness.store import MANIFEST_FILE
from dynts.kv.attention import StepContext, use_dynts_attention
from dynts.models.loading import LoadedModel

LABELS_DIR = "labels"  # TRACE_DIR/labels/ holds the label set of a trace directory: the index and its shards
INDEX_FILE = "index.json"
REFERENCE_RULE = (
    "accumulated attention (mean over layers and query heads, summed over queries) each thinking token receives "
    "from later thinking queries before the answer, self-attention excluded"
)
SENTENCE_ENDS = (". ", "! ", "? ", "\n")
ANSWER_RULE = (
    "after the last </think>; without think markers: the final sentence holding the last \\boxed{}, "
    "else the final sentence"
)


@dataclass(frozen=True)
class Spans:
    """Token positions within one trace (prompt + generated)."""

    prompt_len: int
    think_start: int
    think_end: int  # thinking tokens are [think_start, think_end)
    answer_start: int  # answer queries are [answer_start, length)

    def as_list(self) -> list[int]:
        return [self.prompt_len, self.think_start, self.think_end, self.answer_start]


def _find_last(seq: list[int], pattern: list[int], start: int) -> int:
    for i in range(len(seq) - len(pattern), start - 1, -1):
        if seq[i : i + len(pattern)] == pattern:
            return i
    return -1


def find_spans(token_ids: list[int], prompt_len: int, tokenizer, think_end_ids=(), think_start_ids=()) -> Spans | None:
    """Thinking and answer spans of a trace, or None when it has no usable answer or no thinking."""
    length = len(token_ids)
    think_start = prompt_len
    if think_start_ids:
        opened = _find_last(token_ids[: prompt_len + 8], list(think_start_ids), 0)
        if opened >= 0:
            think_start = max(prompt_len, opened + len(think_start_ids))
    if think_end_ids:
        closed = _find_last(token_ids, list(think_end_ids), prompt_len)
        if closed >= 0:
            answer_start = closed + len(think_end_ids)
            spans = Spans(prompt_len, think_start, closed, answer_start)
            return spans if answer_start < length and closed > think_start else None
    answer_start = _final_sentence_start(token_ids[prompt_len:], tokenizer)
    if answer_start is None:
        return None
    answer_start += prompt_len
    if answer_start <= think_start or answer_start >= length:
        return None
    return Spans(prompt_len, think_start, answer_start, answer_start)


def _final_sentence_start(generated: list[int], tokenizer) -> int | None:
    """Index (within generated) of the first token of the answer sentence."""
    pieces = [tokenizer.decode([t]) for t in generated]
    text = "".join(pieces)
    if not text.strip():
        return None
    box = text.rfind("\\boxed")
    anchor = box if box >= 0 else len(text.rstrip()) - 1
    starts = [text.rfind(sep, 0, anchor) for sep in SENTENCE_ENDS]
    start = max((s + len(sep) for s, sep in zip(starts, SENTENCE_ENDS) if s >= 0), default=0)
    consumed = 0
    for i, piece in enumerate(pieces):
        consumed += len(piece)
        if consumed > start:
            return i
    return None


class AnswerAttention:
    """Attention observer: per key, the attention of answer queries (the labels) and, optionally, of later thinking
    queries (the attention reference), each query's attention to itself zeroed.

    label[j] = mean over layers, query heads and answer queries i >= answer_start of A[i, j].
    reference[j] = sum over thinking queries think_start <= i < answer_start, i != j, of the mean over layers and
    query heads of A[i, j]: the attention token j has received from every later query by the end of thinking,
    i.e. H2O's accumulated score for a selection made just before the answer, with nothing evicted before it.
    """

    observes_attention = True
    wants_probs = False

    def __init__(
        self, length: int, answer_start: int, chunk: int = 128, device="cpu", reference_from: int | None = None
    ):
        self.length, self.answer_start, self.chunk = length, answer_start, chunk
        self.reference_from = reference_from
        self.total = torch.zeros(length, dtype=torch.float64, device=device)
        self.received = torch.zeros(length, dtype=torch.float64, device=device)
        self.rows = 0  # (layer, head, answer query) rows summed into total
        self.layer_heads = 0  # (layer, head) pairs summed into received

    def observe_attention(self, layer_idx, query, key, probs, ctx) -> None:
        _, heads, _, _ = query.shape
        for start in range(self.answer_start, self.length, self.chunk):
            end = min(start + self.chunk, self.length)
            self.total += self._attention(query, key, start, end).sum(dim=(0, 1, 2)).double()
            self.rows += heads * (end - start)
        if self.reference_from is not None:
            for start in range(self.reference_from, self.answer_start, self.chunk):
                end = min(start + self.chunk, self.answer_start)
                self.received += self._attention(query, key, start, end).sum(dim=(0, 1, 2)).double()
            self.layer_heads += heads

    def _attention(self, query, key, start: int, end: int) -> torch.Tensor:
        """Causal attention probabilities [kv_heads, group, end - start, L] of queries [start, end), diagonal zeroed."""
        _, heads, _, dim = query.shape
        kv_heads = key.shape[1]
        keys = key[0].float()  # [kvh, L, d]
        positions = torch.arange(self.length, device=key.device)
        q = query[0, :, start:end].float().reshape(kv_heads, heads // kv_heads, end - start, dim)
        scores = torch.matmul(q, keys.unsqueeze(1).transpose(-1, -2)) * dim**-0.5  # [kvh, g, A, L]
        rows = torch.arange(start, end, device=key.device)
        scores = scores.masked_fill(positions[None, :] > rows[:, None], float("-inf"))
        attn = scores.softmax(dim=-1)
        attn[..., torch.arange(end - start), rows] = 0.0  # no credit for attending to oneself
        return attn

    def labels(self) -> torch.Tensor:
        return (self.total / max(self.rows, 1)).float()

    def reference(self) -> torch.Tensor:
        return (self.received / max(self.layer_heads, 1)).float()


class TraceLabels(NamedTuple):
    labels: torch.Tensor  # [L] float32, answer attention
    hidden: torch.Tensor  # [L, hidden] last hidden states
    reference: torch.Tensor | None  # [L] float32, accumulated attention by the end of thinking (None: not asked)


@torch.no_grad()
def label_trace(
    loaded: LoadedModel, token_ids: list[int], answer_start: int, chunk: int = 128, reference_from: int | None = None
) -> TraceLabels:
    """Labels and last hidden states of one full trace; with reference_from (the first thinking position), also
    the attention reference (see AnswerAttention)."""
    device = loaded.device
    tokens = torch.tensor([token_ids], device=device)
    observer = AnswerAttention(len(token_ids), answer_start, chunk=chunk, device=device, reference_from=reference_from)
    ctx = StepContext(prefill_row=0, observer=observer)
    use_dynts_attention(loaded.model)
    hidden = loaded.model.get_decoder()(
        input_ids=tokens, position_ids=torch.arange(len(token_ids), device=device)[None], use_cache=False, dynts_ctx=ctx
    ).last_hidden_state[0]
    reference = observer.reference().cpu() if reference_from is not None else None
    return TraceLabels(observer.labels().cpu(), hidden.cpu(), reference)


def select_traces(records: list[dict], correct_only: bool) -> list[dict]:
    """All traces, or the first correct sample of each problem."""
    records = [r for r in records if r.get("token_ids") and r.get("prompt_ids")]
    if not correct_only:
        return records
    chosen: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: r["sample"]):
        if r.get("correct") and (r["dataset"], r["id"]) not in chosen:
            chosen[r["dataset"], r["id"]] = r
    return list(chosen.values())


LABEL_UNIT = 16  # traces per work unit: small enough to keep several workers busy on a few hundred traces


def label_traces(host, traces: list[dict]) -> list[dict | None]:
    """Task: label each trace (prompt_ids, token_ids, key); None for a trace without thinking or answer span."""
    loaded = host.loaded
    think_end, think_start = loaded.think_end_ids, think_start_ids(loaded)
    out: list[dict | None] = []
    for trace in traces:
        ids = list(trace["prompt_ids"]) + list(trace["token_ids"])
        spans = find_spans(ids, len(trace["prompt_ids"]), loaded.tokenizer, think_end, think_start)
        if spans is None:
            out.append(None)
            continue
        labels, hidden, reference = label_trace(loaded, ids, spans.answer_start, reference_from=spans.think_start)
        supervised = torch.zeros_like(labels, dtype=torch.bool)
        supervised[spans.think_start : spans.think_end] = True
        out.append(
            {
                "ids": ids,
                "spans": spans.as_list(),
                "labels": labels * supervised,
                "reference": reference * supervised,
                "features": hidden.to(torch.float16),
                "key": list(trace["key"]),
            }
        )
    return out


def model_info(host) -> dict:
    """Task: the name and hidden size of the model the labels come from."""
    return {"name": host.loaded.name, "hidden_size": host.loaded.hidden_size}


def label_store(
    loaded: LoadedModel | None,
    trace_dir: str | Path,
    shard_size: int = 64,
    correct_only: bool | None = None,
    progress: bool = True,
    executor=None,
) -> dict:
    """Label every kept trace of a `dynts collect` directory into trace_dir/labels/; returns the index.

    The traces are labelled in units of LABEL_UNIT by `executor` (default: here, on `loaded`); this driver
    puts the results back in trace order and writes every shard itself, so shards do not depend on where
    or in which order the units ran."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from dynts.harness.store import read_manifest, read_records
    from dynts.runtime.executor import LocalExecutor, Task

    trace_dir = Path(trace_dir)
    if not (trace_dir / MANIFEST_FILE).is_file():
        raise DynTSError(f"{trace_dir} is not a trace directory written by `dynts collect` (no {MANIFEST_FILE})")
    if shard_size < 1:
        raise DynTSError(f"--shard-size must be at least 1, got {shard_size}")
    manifest = read_manifest(trace_dir)
    if correct_only is None:
        correct_only = bool(manifest.get("correct_only", False))
    traces = select_traces(read_records(trace_dir), correct_only)
    if not traces:
        raise DynTSError(
            f"{trace_dir} holds no usable traces"
            + (" (none is correct; collect without --correct-only to keep every trace)" if correct_only else "")
        )
    executor = executor or LocalExecutor(loaded)
    model = executor.call(model_info)
    if manifest.get("model") != model["name"]:
        raise DynTSError(
            f"traces in {trace_dir} were generated by model {manifest.get('model')!r}, "
            f"not {model['name']!r}: label them with the model that wrote them"
        )
    out = trace_dir / LABELS_DIR
    out.mkdir(exist_ok=True)
    for stale in out.glob("labels-*.safetensors"):
        stale.unlink()
    shards, buffer, kept, tokens, skipped = [], [], 0, 0, 0

    def flush():
        nonlocal buffer
        if not buffer:
            return
        name = f"labels-{len(shards):05d}.safetensors"
        offsets = [0]
        for item in buffer:
            offsets.append(offsets[-1] + len(item["ids"]))
        tensors = {
            "token_ids": torch.tensor([t for item in buffer for t in item["ids"]], dtype=torch.int32),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
            "spans": torch.tensor([item["spans"] for item in buffer], dtype=torch.int64),
            "labels": torch.cat([item["labels"] for item in buffer]),
            "reference": torch.cat([item["reference"] for item in buffer]),
            "features": torch.cat([item["features"] for item in buffer]).to(torch.float16),
        }
        keys = [item["key"] for item in buffer]
        save_file(tensors, str(out / name), metadata={"model": model["name"], "keys": json.dumps(keys)})
        shards.append(name)
        buffer = []

    units = [
        [
            {"prompt_ids": r["prompt_ids"], "token_ids": r["token_ids"], "key": (r["dataset"], r["id"], r["sample"])}
            for r in traces[start : start + LABEL_UNIT]
        ]
        for start in range(0, len(traces), LABEL_UNIT)
    ]
    arrived: dict[int, list] = {}
    next_unit = 0
    bar = tqdm(total=len(traces), desc="label", unit="trace", disable=not progress or None)
    for task, results in executor.run(Task(label_traces, (unit,), tag=i) for i, unit in enumerate(units)):
        arrived[task.tag] = results
        bar.update(len(results))
        while next_unit in arrived:  # shards fill in trace order, whatever order the units finish in
            for item in arrived.pop(next_unit):
                if item is None:
                    skipped += 1
                    continue
                buffer.append(item)
                kept += 1
                tokens += len(item["ids"])
                if len(buffer) >= shard_size:
                    flush()
            next_unit += 1
    bar.close()
    flush()
    if kept == 0:
        raise DynTSError(f"no trace in {trace_dir} has both thinking tokens and an answer span ({ANSWER_RULE})")
    index = {
        "model": model["name"],
        "hidden_size": model["hidden_size"],
        "shards": shards,
        "traces": kept,
        "skipped": skipped,
        "tokens": tokens,
        "answer_rule": ANSWER_RULE,
        "reference_rule": REFERENCE_RULE,
        "correct_only": correct_only,
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def think_start_ids(loaded: LoadedModel) -> tuple[int, ...]:
    vocab = loaded.tokenizer.get_vocab() if hasattr(loaded.tokenizer, "get_vocab") else {}
    return (vocab["<think>"],) if "<think>" in vocab else ()


# --- reading a label set back (dynts train) ------------------------------------------------------------
def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class LabelSet:
    """The supervised (thinking) tokens of every trace in a label directory.

    Rows of `features` / `labels` / `positions` are grouped by trace: trace i owns rows
    [offsets[i], offsets[i+1]). `positions` are token positions within the trace (prompt included).
    """

    directory: Path
    model: str
    hidden_size: int
    answer_rule: str
    keys: list[tuple]
    spans: torch.Tensor  # int64 [N, 4]
    lengths: torch.Tensor  # int64 [N], full trace lengths
    offsets: torch.Tensor  # int64 [N + 1] into the supervised rows
    features: torch.Tensor  # float16 [S, hidden]
    labels: torch.Tensor  # float32 [S], raw
    positions: torch.Tensor  # int64 [S]
    reference: torch.Tensor | None = None  # float32 [S], the attention reference; None in shards made without it
    index: dict = field(default_factory=dict)

    @property
    def num_traces(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        """Supervised (thinking) tokens."""
        return int(self.labels.numel())

    @property
    def total_tokens(self) -> int:
        return int(self.lengths.sum())

    def supervised_count(self, trace: int) -> int:
        return int(self.offsets[trace + 1] - self.offsets[trace])

    def trace_rows(self, trace: int) -> slice:
        return slice(int(self.offsets[trace]), int(self.offsets[trace + 1]))

    def rows(self, traces: Sequence[int]) -> torch.Tensor:
        """Row indices of the supervised tokens of `traces`, in order."""
        parts = [torch.arange(int(self.offsets[t]), int(self.offsets[t + 1])) for t in traces]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def _labels_dir(directory: Path) -> Path:
    if (directory / LABELS_DIR / INDEX_FILE).is_file():
        return directory / LABELS_DIR
    if (directory / INDEX_FILE).is_file() and directory.name == LABELS_DIR:
        return directory  # the labels directory itself
    trace_dir = directory.parent if directory.name == LABELS_DIR else directory
    raise DynTSError(
        f"no label set in {directory}: {trace_dir / LABELS_DIR / INDEX_FILE} is missing; "
        f"run `dynts label {trace_dir}` first"
    )


def label_set_model(directory: str | Path) -> str | None:
    """The model a label set was made with, read from its index (a trace directory or its labels/ directory);
    None when there is no readable index (loading the label set then says why)."""
    try:
        index = json.loads((_labels_dir(Path(directory)) / INDEX_FILE).read_text())
    except (DynTSError, OSError, ValueError):
        return None
    model = index.get("model") if isinstance(index, dict) else None
    return model if isinstance(model, str) else None


def load_label_set(
    directory: str | Path, expected_model: str | None = None, expected_hidden_size: int | None = None
) -> LabelSet:
    """Read DIR/labels/index.json and every shard it lists, keeping the supervised (thinking) tokens."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    labels_dir = _labels_dir(directory)
    index_path = labels_dir / INDEX_FILE
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise DynTSError(f"label index {index_path} is unreadable: {exc}; run `dynts label` again") from None
    if not isinstance(index, dict):
        raise DynTSError(f"label index {index_path} is malformed (not a JSON object); run `dynts label` again")
    model, hidden_size, shards = index.get("model"), index.get("hidden_size"), index.get("shards")
    if (
        not isinstance(model, str)
        or not is_int(hidden_size)
        or hidden_size <= 0
        or not isinstance(shards, list)
        or not all(isinstance(s, str) for s in shards)
    ):
        raise DynTSError(
            f"label index {index_path} is malformed: it needs 'model' (string), 'hidden_size' "
            "(positive integer) and 'shards' (list of file names); run `dynts label` again"
        )
    if expected_model is not None and model != expected_model:
        raise DynTSError(
            f"labels in {labels_dir} were made with model {model!r}, not {expected_model!r}: "
            "a head only fits the model whose hidden states it was trained on"
        )
    if expected_hidden_size is not None and hidden_size != expected_hidden_size:
        raise DynTSError(
            f"labels in {labels_dir} hold hidden states of size {hidden_size} (model {model!r}), "
            f"but the expected hidden size is {expected_hidden_size}"
        )

    keys: list[tuple] = []
    spans_parts, length_parts, count_parts = [], [], []
    feature_parts, label_parts, position_parts, reference_parts = [], [], [], []
    for name in shards:
        path = labels_dir / name
        if not path.is_file():
            raise DynTSError(f"label shard {path} listed in {index_path} is missing; run `dynts label` again")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in ("token_ids", "offsets", "spans", "labels", "features")}
                reference = f.get_tensor("reference") if "reference" in f.keys() else None
        except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DynTSError(f"label shard {path} is corrupt ({first}); run `dynts label` again") from None
        shard = _check_shard(path, tensors, metadata, hidden_size, model)
        n = shard["spans"].shape[0]
        keys += shard["keys"]
        spans_parts.append(shard["spans"])
        offsets = shard["offsets"]
        length_parts.append(offsets[1:] - offsets[:-1])
        rows, positions, counts = [], [], []
        for i in range(n):
            start, think_start, think_end = int(offsets[i]), int(shard["spans"][i, 1]), int(shard["spans"][i, 2])
            rows.append(torch.arange(start + think_start, start + think_end))
            positions.append(torch.arange(think_start, think_end))
            counts.append(think_end - think_start)
        rows_t = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        labels = tensors["labels"][rows_t].float()
        if labels.numel() and (not torch.isfinite(labels).all() or (labels < 0).any()):
            raise DynTSError(
                f"label shard {path} is corrupt: labels of thinking tokens must be finite and "
                "non-negative (they are attention probabilities); run `dynts label` again"
            )
        features = tensors["features"][rows_t].to(torch.float16)
        if features.numel() and not torch.isfinite(features).all():
            raise DynTSError(f"label shard {path} holds non-finite hidden states; run `dynts label` again")
        if reference is not None and tuple(reference.shape) != tuple(tensors["labels"].shape):
            raise DynTSError(f"label shard {path} is corrupt: its attention reference does not match its labels")
        reference_parts.append(None if reference is None else reference[rows_t].float())
        feature_parts.append(features)
        label_parts.append(labels)
        position_parts.append(torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64))
        count_parts.append(torch.tensor(counts, dtype=torch.int64))
        del tensors

    counts = torch.cat(count_parts) if count_parts else torch.zeros(0, dtype=torch.int64)
    if int(counts.sum()) == 0:
        raise DynTSError(
            f"empty label set in {labels_dir}: no trace has supervised (thinking) tokens; "
            "collect more traces (or traces with thinking before the answer) and label again"
        )
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return LabelSet(
        directory=labels_dir.parent,
        model=model,
        hidden_size=hidden_size,
        answer_rule=str(index.get("answer_rule", "")),
        keys=keys,
        spans=torch.cat(spans_parts),
        lengths=torch.cat(length_parts),
        offsets=offsets,
        features=torch.cat(feature_parts),
        labels=torch.cat(label_parts),
        positions=torch.cat(position_parts),
        reference=None if any(r is None for r in reference_parts) else torch.cat(reference_parts),
        index=index,
    )


def _check_shard(path: Path, t: dict, metadata: dict, hidden_size: int, model: str) -> dict:
    def bad(why: str):
        return DynTSError(f"label shard {path} is corrupt: {why}; run `dynts label` again")

    names = ("token_ids", "offsets", "spans", "labels", "features")
    token_ids, offsets, spans, labels, features = (t[k] for k in names)
    if token_ids.dim() != 1 or offsets.dim() != 1 or offsets.numel() < 1:
        raise bad("token_ids and offsets must be 1-D")
    total, n = token_ids.numel(), offsets.numel() - 1
    offsets, spans = offsets.long(), spans.long()
    if int(offsets[0]) != 0 or int(offsets[-1]) != total or (n and bool((offsets[1:] < offsets[:-1]).any())):
        raise bad(f"offsets must rise from 0 to the {total} tokens")
    if tuple(spans.shape) != (n, 4):
        raise bad(f"spans has shape {tuple(spans.shape)}, expected ({n}, 4)")
    if tuple(labels.shape) != (total,):
        raise bad(f"labels has shape {tuple(labels.shape)}, expected ({total},)")
    if features.dim() != 2 or features.shape[0] != total:
        raise bad(f"features has shape {tuple(features.shape)}, expected ({total}, {hidden_size})")
    if features.shape[1] != hidden_size:
        raise DynTSError(
            f"label shard {path} holds hidden states of size {features.shape[1]}, but its index says "
            f"{hidden_size}; run `dynts label` again"
        )
    lengths = offsets[1:] - offsets[:-1]
    if n and bool(((spans[:, 1] < 0) | (spans[:, 1] > spans[:, 2]) | (spans[:, 2] > lengths)).any()):
        raise bad("a thinking span [think_start, think_end) lies outside its trace")
    if metadata.get("model") not in (None, model):
        raise DynTSError(
            f"label shard {path} was made with model {metadata['model']!r}, but its index says "
            f"{model!r}; run `dynts label` again"
        )
    if "keys" in metadata:
        try:
            raw = json.loads(metadata["keys"])
            if not isinstance(raw, list) or len(raw) != n:
                raise ValueError(f"{len(raw) if isinstance(raw, list) else 'no'} keys for {n} traces")
            keys = [tuple(k) if isinstance(k, list) else (None, k, 0) for k in raw]
        except (ValueError, TypeError) as exc:
            raise bad(f"its 'keys' metadata is unreadable ({exc})") from None
    else:  # no keys: every trace is its own problem
        keys = [(path.name, i, 0) for i in range(n)]
    return {"offsets": offsets, "spans": spans, "keys": keys}
