"""`dynts serve MODEL`: an OpenAI-compatible HTTP server decoding under a fixed KV budget (pip install "dynts[serve]").

The engine flags are `dynts generate`'s; the server's own say where it listens, who may call it, how many requests
may wait, and how thinking is split from the answer. With --replicas N (or --ray-address) the same server runs as N
engine replicas on Ray Serve behind one ingress. Heavy imports (torch, fastapi, ray) happen in cmd_serve only.
"""

from __future__ import annotations

from dynts.cli.args import add_model_flags, add_policy_flags, add_sampling_flags, engine_spec_from_args
from dynts.errors import DynTSError
from dynts.serving.reasoning import PARSERS as REASONING_PARSERS  # a light module: no torch, no fastapi


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (chat and completions, streamed) under a fixed KV budget",
        description="Serve MODEL over OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models), with "
        "/health and /metrics. Request fields override the sampling flags; kv_budget (extra_body) sets a "
        "sequence's own budget, at most --budget.",
    )
    p.add_argument(
        "model_name",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="the model to serve (as --model; default smollm2-135m)",
    )
    add_model_flags(p)
    add_policy_flags(p)
    add_sampling_flags(p, max_new_tokens=1024)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on /v1 (default: $DYNTS_API_KEY, else no key)",
    )
    g.add_argument(
        "--served-model-name", default=None, help="the name clients send as `model` (default: MODEL as given)"
    )
    g.add_argument(
        "--max-queued",
        type=int,
        default=256,
        help="sequences that may wait for a batch row; beyond that a request gets 503 + Retry-After (default 256)",
    )
    g.add_argument(
        "--reasoning-parser",
        default=None,
        choices=REASONING_PARSERS,
        help="split thinking (reasoning_content) from the answer (content); default: qwen3 for a model with a "
        "</think> token (deepseek_r1 for an R1 model), else none",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="cache slots per row when the policy has no budget (full): prompt + max_tokens must fit (default: the "
        "model's max positions, at most 4096)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds in-flight requests may still run before they are aborted (default 30)",
    )
    r = p.add_argument_group('scale-out on Ray Serve (pip install "ray[serve]")')
    r.add_argument(
        "--replicas", type=int, default=1, help="engine replicas behind one ingress; above 1 runs on Ray Serve"
    )
    r.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster ('auto', ray://HEAD:10001) and deploy there (default with --replicas > 1: a "
        "local Ray instance)",
    )
    r.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        help="GPUs each replica reserves (default: 1 when CUDA is present and --device is not cpu, else 0)",
    )
    p.set_defaults(func=cmd_serve)


def settings_from_args(args):
    from dynts.serving.server import ServerSettings

    if args.model_name is not None and args.model != "smollm2-135m" and args.model != args.model_name:
        raise DynTSError(f"MODEL {args.model_name} and --model {args.model} disagree: give one of them")
    return ServerSettings(
        model=args.model_name or args.model,
        device=args.device,
        dtype=args.dtype,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        api_key=ServerSettings.resolve_key(args.api_key),
        max_queued=args.max_queued,
        reasoning_parser=args.reasoning_parser,
        shutdown_timeout=args.shutdown_timeout,
    )


def cmd_serve(args) -> int:
    spec = engine_spec_from_args(args)  # every flag checked before the model loads
    settings = settings_from_args(args)
    if args.replicas < 1:
        raise DynTSError(f"--replicas must be at least 1, got {args.replicas}")
    if args.replicas > 1 or args.ray_address is not None:
        from dynts.serving.ray_serve import RayServeOptions, run_on_ray

        return run_on_ray(settings, spec, RayServeOptions(args.replicas, args.ray_address, args.gpus_per_replica))
    from dynts.serving.server import run

    return run(settings, spec)
