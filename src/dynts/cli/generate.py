"""`dynts generate`: decode prompts under a KV budget and print texts and statistics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dynts.cli.args import add_model_flags, add_policy_flags, add_sampling_flags, budget_from_args, sampling_from_args
from dynts.cli.execution import build_engine
from dynts.errors import DynTSError


def register(sub) -> None:
    gen = sub.add_parser("generate", help="decode prompts under a KV budget and print texts and statistics")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (the model's chat template is applied)")
    src.add_argument("--prompts-file", help="one prompt per line, or a .jsonl file with a 'prompt' field per line")
    gen.add_argument("--raw", action="store_true", help="feed prompts as they are, without the chat template")
    gen.add_argument(
        "--json", action="store_true", help="print one JSON object per prompt: text, token_ids, prompt_tokens, stats"
    )
    add_model_flags(gen)
    add_policy_flags(gen)
    add_sampling_flags(gen, max_new_tokens=1024)
    gen.set_defaults(func=cmd_generate)


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise DynTSError(f"--prompts-file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                prompts.append(json.loads(line)["prompt"])
            except (ValueError, KeyError, TypeError):
                raise DynTSError(f"{path}:{number}: expected a JSON object with a 'prompt' field") from None
        else:
            prompts.append(line)
    if not prompts:
        raise DynTSError(f"--prompts-file {path} holds no prompts")
    return prompts


def cmd_generate(args) -> int:
    from tqdm import tqdm

    prompts = read_prompts(args)
    budget_from_args(args), sampling_from_args(args)  # fail before any output
    bar = tqdm(desc="decoding", unit="tok", disable=None, file=sys.stderr, leave=False)
    engine = build_engine(args, on_step=bar.update)
    output = engine.generate(prompts, chat=not args.raw)
    bar.close()
    if args.json:
        for prompt, result in zip(prompts, output.results):
            print(json.dumps({"prompt": prompt, **result.to_dict()}), flush=True)
        return 0
    for i, (prompt, result) in enumerate(zip(prompts, output.results)):
        print(f"=== prompt {i}: {prompt[:70]!r}")
        print(result.text)
        print()
    print(format_stats(output, engine))
    return 0


def format_stats(output, engine) -> str:
    run = output.stats
    budget = engine.budget
    frame = f"B={budget.budget} W={budget.window} r={budget.ratio}" if budget.compresses else "no budget"
    rows = [
        ("policy", f"{engine.policy.name} ({frame})"),
        ("sequences", run.sequences),
        ("generated tokens", run.generated_tokens),
        ("TPS (end to end)", f"{run.tps:.1f}"),
        ("TPS (forward only)", f"{run.tps_forward:.1f}"),
        ("decode time", f"{run.decode_time_s:.2f} s"),
        ("peak KV tokens (batch)", run.peak_kv_tokens),
        ("peak KV memory (batch)", f"{run.peak_kv_bytes / 2**20:.1f} MiB"),
        ("compressions", run.compressions),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
