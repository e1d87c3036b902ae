"""The `specdec` command line. Every flag also reads a SPECDEC_* environment variable (for containers):
`--max-new-tokens` <- SPECDEC_MAX_NEW_TOKENS; a repeated flag takes a comma-separated list.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

from specdec import settings
from specdec.models import DEFAULT_DRAFTER, DEFAULT_TARGET

DEFAULT_PORT = 50051


def _env_name(flag: str) -> str:
    return "SPECDEC_" + flag.lstrip("-").replace("-", "_").upper()


def flag(parser: argparse.ArgumentParser, name: str, *, default=None, type=str, help: str, **kwargs) -> None:
    """Adds --name whose default comes from SPECDEC_NAME when set; the help says so."""
    env = _env_name(name)
    value = os.environ.get(env)
    if value is not None:
        if kwargs.get("action") == "append":
            default = [type(v) for v in value.split(",") if v]
        elif kwargs.get("action") == "store_true":
            default = value.strip().lower() in settings.YES
        else:
            default = type(value)
    if kwargs.get("action") == "store_true":
        parser.add_argument(name, default=default or False, help=f"{help} [env {env}]", **kwargs)
    else:
        shown = "" if default in (None, []) else f" (default: {default})"
        parser.add_argument(name, default=default, type=type, help=f"{help}{shown} [env {env}]", **kwargs)


def _yes_no(value: str) -> bool:
    try:
        return settings.yes_no(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def dtype_flag(p: argparse.ArgumentParser) -> None:
    flag(p, "--dtype", default="auto", type=str.lower, choices=("auto", *settings.DTYPES),
         help="the engines' number format, for every tier started here: auto = bfloat16 on CUDA, float32 on a CPU. "
         "On a GPU, bfloat16 rounds a verify pass and a decode step differently, so greedy output with speculation "
         "can part from speculation off's at a near-tie (H200: 25 of 64 answers of 128 tokens the same); float32 "
         "gives it token for token (64 of 64) at ~10%% of one user's speed for the default target. Every tier of a "
         "deployment should use the same")


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _layer_lists(text: str) -> list[list[int]]:
    """"2,15,29;3,20,29" -> [[2, 15, 29], [3, 20, 29]]."""
    try:
        lists = [[int(x) for x in part.split(",") if x.strip()] for part in text.split(";") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: layer indices separated by commas, lists by semicolons, "
                                         "e.g. 2,15,29") from None
    if not lists or not all(lists):
        raise argparse.ArgumentTypeError(f"{text!r}: no layers given")
    return lists


def _serving_flags(p: argparse.ArgumentParser, port: int, host: str = "0.0.0.0", metrics_port: int = 9464) -> None:
    flag(p, "--host", default=host, help="address to listen on")
    flag(p, "--port", default=port, type=int, help="port to listen on (0 picks a free one)")
    flag(p, "--metrics-port", default=metrics_port, type=int,
         help="Prometheus metrics on http://HOST:PORT/metrics (0 = off); traces: see docs/telemetry.md")
    flag(p, "--grace", default=30.0, type=float, help="seconds sessions in flight get to finish after SIGTERM")
    flag(p, "--threads", default=0, type=int,
         help="torch CPU threads of this process (0 = the CPU limit: a container's quota, else the usable cores; "
         "at most 2 when --device is a GPU, whose passes leave little CPU math); several servers on one machine "
         "should share the cores between them")


def _compile_flag(p: argparse.ArgumentParser) -> None:
    flag(p, "--compile", default=False, type=_yes_no,
         help="on CUDA, torch.compile the decode/verify pass before capturing it (about 2x faster at batch 1 on "
         "an H200; minutes before serving when a verifier warms its graphs up: ~5 min for --max-sessions 2 on an "
         "H200, as each compiled capture takes ~13 s): yes|no")


def _verifier_flags(p: argparse.ArgumentParser) -> None:
    _compile_flag(p)
    dtype_flag(p)
    flag(p, "--max-sessions", default=8, type=int, help="KV slots: sessions the verifier holds at once")
    flag(p, "--max-sequence-length", default=2048, type=int, help="context per session (prompt + generated)")
    flag(p, "--max-block", default=16, type=int, help="longest draft block the verifier accepts")
    flag(p, "--decode-chunk-ms", default=10.0, type=float,
         help="speculation off, every open session in the tick: keep decoding while another step fits in this "
         "many ms and nothing else waits (fewer hand-offs and messages per token; 0 = one token per tick)")
    flag(p, "--decode-ahead-steps", default=-1, type=int,
         help="greedy steps such a chunk queues behind its own, which the next chunk takes up, so a GPU keeps "
         "working while the tokens go out (-1: measured default for the device, 2 on CUDA, 0 on CPU, where they "
         "would run before the tokens go out)")
    flag(p, "--graph-warmup-tokens", default=512, type=int,
         help="on CUDA, capture the CUDA graphs of decode steps and verify passes for every batch size up to "
         "--max-sessions (and of prefills of up to 4 prompts) and contexts up to this many tokens before serving, "
         "so no user waits for a capture "
         "(seconds at start-up; with --compile, the compilation too); longer contexts capture on first use "
         "(0 = all on first use)")
    flag(p, "--graph-warmup-feature-layers", default=None, type=_layer_lists, metavar="LAYERS",
         help="also capture before serving the verify passes that return these target layers' hidden states: a "
         "fused drafter's `taps` from its config.json, e.g. 2,15,29 (several drafters: 2,15,29;3,20,29); else "
         "they are captured when a session first asks for them, mid-serving")
    flag(p, "--prefix-cache-blocks", default=256, type=int,
         help="prefix cache size in 16-token KV blocks (0 = off); the memory budget of reused prompts")
    flag(p, "--advise-speculation-max-sessions", default=-1, type=int,
         help="sessions in flight past which drafts cost this verifier more than they save, advised to routers "
         "and drafters (-1: measured default for the device, 1 on CPU, 8 on CUDA; 0: no advice)")
    flag(p, "--advise-draft-tokens", default=-1, type=int,
         help="draft length advised to routers for requests that leave it unset (-1: measured default for the "
         "device, 3 on CPU, 5 on CUDA; 0: no advice)")
    flag(p, "--advise-draft-tree", default="auto", type=_advised_tree,
         help="draft tree shape advised to drafters that follow the advice (`--draft-tree auto`, their default): "
         "auto = measured at start-up (on a CPU, 2x2 trees where a pass of a tree's tokens costs at most 1.3x a "
         "decode step, else chains; chains on a GPU), off = chains, or BRANCHxBEAM")


def _locality_flags(p: argparse.ArgumentParser) -> None:
    flag(p, "--redis-url", default=None, help="locality store, e.g. redis://redis:6379/0 (unset: no shared hints)")
    flag(p, "--locality-ttl", default=30.0, type=float,
         help="seconds a locality entry lives unless refreshed (heartbeat every ttl/3)")
    flag(p, "--redis-timeout", default=0.05, type=float,
         help="seconds a Redis call may take before the circuit breaker counts a failure")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; `command` (the subcommand about to run) lets it skip loading the other heavy ones."""
    parser = argparse.ArgumentParser(
        prog="specdec",
        description="Disaggregated speculative decoding: drafters propose, verifiers check in batches, "
        "a router pairs them. Output is exactly what the target model alone produces.",
        epilog="Start with `specdec serve` (all-in-one) and `specdec generate \"Hello\" --chat`.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run servers (all-in-one without a role)",
        description="Without a role: router, drafter and verifier in one process on loopback, default models. "
        "With a role: one tier, to deploy each tier on its own.",
    )
    _serving_flags(serve, DEFAULT_PORT, host="127.0.0.1", metrics_port=0)
    flag(serve, "--model", default=DEFAULT_TARGET, help="target model SPEC (HF dir, .gguf file or alias)")
    flag(serve, "--drafter-model", default=DEFAULT_DRAFTER,
         help="drafter SPEC: a trained drafter, `ngram`, or a small model with the target's tokenizer")
    flag(serve, "--device", default="cpu", help="torch device for both models, e.g. cpu or cuda:0")
    flag(serve, "--max-draft-tokens", default=-1, type=int,
         help="default draft block length k (-1: the verifier's advice for its device, 3 on CPU, 5 on CUDA)")
    _tree_flag(serve)
    _verifier_flags(serve)
    serve.set_defaults(func=cmd_serve_all)
    roles = serve.add_subparsers(dest="role", metavar="ROLE")

    r = roles.add_parser("router", help="the client-facing Generation service")
    _serving_flags(r, DEFAULT_PORT)
    flag(r, "--drafter", action="append", help="drafter address host:port (repeat for several)")
    flag(r, "--verifier", action="append", help="verifier address host:port (repeat for several)")
    flag(r, "--discovery", default="static", choices=("static", "kubernetes"),
         help="where pod addresses come from: static = the --drafter/--verifier lists; kubernetes = the ready "
         "endpoints of --verifier-service and --drafter-service (EndpointSlice watch; needs list+watch RBAC)")
    flag(r, "--verifier-service", default=None,
         help="with --discovery kubernetes: the verifiers' Service, whose ready endpoints (port named grpc) get routed")
    flag(r, "--drafter-service", default=None,
         help="with --discovery kubernetes: the drafters' Service (unset: the --drafter list, or verifiers alone)")
    flag(r, "--kube-namespace", default=None,
         help="namespace of those Services (default: this pod's own namespace, else `default`)")
    flag(r, "--model", default=DEFAULT_TARGET, help="target SPEC whose tokenizer and chat template to use")
    flag(r, "--max-draft-tokens", default=-1, type=int,
         help="default draft block length k (-1: the verifiers' advice for their device, 3 on CPU, 5 on CUDA)")
    flag(r, "--max-new-tokens-limit", default=4096, type=int, help="largest max_new_tokens a request may ask")
    _locality_flags(r)
    flag(r, "--routing", default="locality", choices=("locality", "round-robin", "random"),
         help="verifier choice: cached prefix against load, or a baseline to compare with")
    flag(r, "--route-cache-weight", default=1.0, type=float, help="score per cached 16-token prefix block")
    flag(r, "--route-load-weight", default=4.0, type=float, help="score penalty per session in flight on a verifier")
    flag(r, "--route-load-slack", default=2, type=int,
         help="sessions above the least-loaded verifier before a verifier is skipped as overloaded")
    flag(r, "--speculation-max-sessions", default=-1, type=int,
         help="a verifier with this many sessions in flight decodes new sessions without a drafter, since drafts "
         "would cost it throughput (-1 = the verifiers' advice for their device: 2 on CPU, 8 on CUDA; 0 = always "
         "speculate; seeded sampling always does)")
    r.set_defaults(func=cmd_serve_router)

    d = roles.add_parser("drafter", help="a drafter pod")
    _serving_flags(d, 50052)
    flag(d, "--model", default=DEFAULT_DRAFTER,
         help="drafter SPEC: a trained drafter (the default one ships for the default target), `ngram`, or a small "
         "Hugging Face model with the target's tokenizer")
    flag(d, "--target", default=DEFAULT_TARGET, help="the target SPEC whose embeddings a trained drafter borrows")
    flag(d, "--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    flag(d, "--max-draft-tokens", default=5, type=int, help="draft block length when the request leaves it unset")
    flag(d, "--max-sessions", default=64, type=int, help="sessions drafted at once (model drafter KV slots)")
    flag(d, "--prefix-cache-blocks", default=256, type=int,
         help="model drafter's prefix cache size in 16-token KV blocks (0 = off): shared prompts prefill once")
    _compile_flag(d)
    dtype_flag(d)
    flag(d, "--proactive", default=None, type=_yes_no,
         help="draft the next block while one is verified: yes|no (default: yes on a CUDA device)")
    _tree_flag(d)
    d.set_defaults(func=cmd_serve_drafter)

    v = roles.add_parser("verifier", help="a verifier pod")
    _serving_flags(v, 50053)
    flag(v, "--model", default=DEFAULT_TARGET, help="target model SPEC")
    flag(v, "--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    _verifier_flags(v)
    _locality_flags(v)
    flag(v, "--advertise", default=None,
         help="this verifier's address as routers know it (default: host:port, the hostname for 0.0.0.0)")
    v.set_defaults(func=cmd_serve_verifier)

    g = sub.add_parser("generate", help="stream a generation from a running router",
                       description="Calls Generate on a router and prints the text as it is committed.")
    g.add_argument("prompt", help="the prompt text")
    flag(g, "--address", default=f"127.0.0.1:{DEFAULT_PORT}", help="router address")
    flag(g, "--chat", action="store_true", help="send the prompt as a user message (chat template applied)")
    flag(g, "--max-new-tokens", default=128, type=int, help="tokens to generate at most")
    flag(g, "--temperature", default=0.0, type=float, help="0 = greedy")
    flag(g, "--top-p", default=0.0, type=float, help="nucleus sampling mass (0 = off)")
    flag(g, "--top-k", default=0, type=int, help="top-k sampling (0 = off)")
    flag(g, "--seed", default=None, type=int, help="same seed, same output")
    flag(g, "--stop", action="append", help="stop string (repeat for several)")
    flag(g, "--no-speculation", action="store_true", help="target alone (max_draft_tokens = 0)")
    flag(g, "--max-draft-tokens", default=None, type=int, help="draft block length (server default when unset)")
    g.set_defaults(func=cmd_generate)

    prep = sub.add_parser("prepare-models", help="convert the default models once so servers start fast")
    flag(prep, "--model", default=DEFAULT_TARGET, help="model SPEC to prepare")
    prep.set_defaults(func=cmd_prepare)

    for name, (module, summary) in _HEAVY_COMMANDS.items():
        if command in (None, name):
            __import__(module, fromlist=["add_parser"]).add_parser(sub, summary)
        else:  # listed in `specdec --help` without importing torch for every other command
            sub.add_parser(name, help=summary)
    return parser


# Commands whose modules import torch at load: built only when asked for (or when no command is given); the
# summary here is the one `specdec --help` shows either way.
_HEAVY_COMMANDS = {
    "bench": ("specdec.bench", "benchmark sweep: concurrency x modes, JSON + PNG"),
    "train-drafter": ("specdec.train_drafter", "train a drafter for a target by self-distillation"),
    "eval-drafter": ("specdec.eval_drafter", "measure a drafter's tau and acceptance against a target"),
}


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on a command line (its first word that is not an option)."""
    return next((word for word in argv if not word.startswith("-")), None)


# -- commands ---------------------------------------------------------------------------------------------------------
def _tree_shape(spec: str):
    """--draft-tree: FOLLOW_VERIFIER for "auto", None for chains, else the TreeShape."""
    from specdec.draft_tree import FOLLOW_VERIFIER, TreeShape

    if spec.strip().lower() == FOLLOW_VERIFIER:
        return FOLLOW_VERIFIER
    try:
        return TreeShape.parse(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _advised_tree(spec: str) -> str:
    """--advise-draft-tree: "auto", or a shape --draft-tree takes (checked here, kept as written)."""
    _tree_shape(spec)
    return spec.strip().lower()


def _tree_flag(parser) -> None:
    flag(parser, "--draft-tree", default="auto", type=_tree_shape,
         help="draft trees instead of chains, BRANCHxBEAM: the root gets BRANCH children and each next level's BEAM "
         "likeliest nodes BRANCH each, k levels deep (e.g. 4x4: up to 4 + 16 (k - 1) tokens a block, verified in one "
         "pass). Feature drafters only, where the verifier takes trees; off = chains; auto = what the verifier "
         "advises (its `--advise-draft-tree`: on a CPU where wide passes are cheap, 2x2; else chains)")


def cmd_serve_all(args) -> int:
    if args.role:  # argparse dispatches roles through their own func; this is the bare `serve`
        return args.func(args)
    from drafter_service.app import start_drafter
    from router.app import start_router
    from specdec.server import run_servers
    from verifier_service.app import start_verifier

    from specdec.locality import InProcessStore

    _start_telemetry(args, "specdec")  # one provider for the three tiers of this process

    async def main():
        from specdec.drafter_model import feature_layers

        drafter_model = args.drafter_model
        if drafter_model == DEFAULT_DRAFTER and args.model != DEFAULT_TARGET:
            logging.getLogger("specdec").warning(
                "the shipped drafter belongs to %s; drafting for %s with ngram (train one: specdec train-drafter)",
                DEFAULT_TARGET, args.model)
            drafter_model = "ngram"
        # the drafter here is known: its layers' verify graphs are captured with the others
        found = feature_layers(drafter_model)
        layers = args.graph_warmup_feature_layers or ([found] if found else None)
        store = InProcessStore()  # all-in-one: the locality store is a dict shared by verifier and router
        verifier = await start_verifier(
            "127.0.0.1", 0, args.model, args.device, args.max_sessions, args.max_sequence_length, args.max_block,
            args.grace, args.prefix_cache_blocks, store=store, decode_chunk_ms=args.decode_chunk_ms,
            decode_ahead_steps=args.decode_ahead_steps,
            advise=(args.advise_speculation_max_sessions, args.advise_draft_tokens),
            advise_draft_tree=args.advise_draft_tree,
            graph_warmup_tokens=args.graph_warmup_tokens, graph_warmup_feature_layers=layers,
        )
        drafter = await start_drafter("127.0.0.1", 0, drafter_model, args.device,
                                      args.max_draft_tokens if args.max_draft_tokens > 0 else 5,
                                      grace=args.grace, target=args.model, tree=args.draft_tree)
        router = await start_router(
            args.host, args.port, [verifier.address], [drafter.address], args.model, args.max_draft_tokens,
            grace=args.grace, store=store,
        )
        # Start the back tiers first so the router's first request finds them.
        await verifier.start()
        await drafter.start()
        print(f"specdec all-in-one serving on {router.address} (verifier {verifier.address}, "
              f"drafter {drafter.address})", flush=True)
        await run_servers([router])
        await drafter.drain()
        await verifier.drain()

    asyncio.run(main())
    return 0


def _start_telemetry(args, service: str) -> None:
    from specdec import telemetry

    port = telemetry.setup(service, args.metrics_port, args.host)
    if port:
        print(f"metrics on :{port}/metrics", flush=True)


def _run_one(start, args) -> int:
    from specdec.server import run_servers

    _start_telemetry(args, f"specdec-{args.role}")

    async def main():
        server = await start()
        print(f"specdec {server.name} serving on {server.address}", flush=True)
        await run_servers([server])

    asyncio.run(main())
    return 0


def cmd_serve_router(args) -> int:
    from router.app import start_router

    discovery = None
    if args.discovery == "kubernetes":
        from router.discovery import KubeDiscovery, pod_namespace

        if not args.verifier_service:
            print("specdec serve router: --discovery kubernetes needs --verifier-service NAME "
                  "(or SPECDEC_VERIFIER_SERVICE)", file=sys.stderr)
            return 2
        discovery = KubeDiscovery(args.kube_namespace or pod_namespace(), args.verifier_service, args.drafter_service)
    elif not args.verifier:
        print("specdec serve router: give at least one --verifier ADDR (or SPECDEC_VERIFIER), "
              "or use --discovery kubernetes", file=sys.stderr)
        return 2
    from router.scoring import Weights

    weights = Weights(args.route_cache_weight, args.route_load_weight, args.route_load_slack)
    return _run_one(lambda: start_router(
        args.host, args.port, args.verifier or [], args.drafter or [], args.model, args.max_draft_tokens,
        args.max_new_tokens_limit, args.grace, redis_url=args.redis_url, routing=args.routing, weights=weights,
        locality_ttl=args.locality_ttl, redis_timeout=args.redis_timeout, discovery=discovery,
        speculation_max_sessions=args.speculation_max_sessions,
    ), args)


def cmd_serve_drafter(args) -> int:
    from drafter_service.app import start_drafter

    return _run_one(lambda: start_drafter(
        args.host, args.port, args.model, args.device, args.max_draft_tokens, args.max_sessions, args.grace,
        args.proactive, args.target, prefix_cache_blocks=args.prefix_cache_blocks, tree=args.draft_tree,
    ), args)


def cmd_serve_verifier(args) -> int:
    from verifier_service.app import start_verifier

    return _run_one(lambda: start_verifier(
        args.host, args.port, args.model, args.device, args.max_sessions, args.max_sequence_length, args.max_block,
        args.grace, args.prefix_cache_blocks, redis_url=args.redis_url, advertise=args.advertise,
        locality_ttl=args.locality_ttl, redis_timeout=args.redis_timeout, decode_chunk_ms=args.decode_chunk_ms,
        decode_ahead_steps=args.decode_ahead_steps,
        advise=(args.advise_speculation_max_sessions, args.advise_draft_tokens),
        advise_draft_tree=args.advise_draft_tree,
        graph_warmup_tokens=args.graph_warmup_tokens,
        graph_warmup_feature_layers=args.graph_warmup_feature_layers,
    ), args)


def cmd_generate(args) -> int:
    from specdec.client import Client, SpecdecError

    kwargs = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=args.stop or (),
        max_draft_tokens=0 if args.no_speculation else args.max_draft_tokens,
    )
    if args.chat:
        kwargs["chat"] = [{"role": "user", "content": args.prompt}]
    else:
        kwargs["prompt"] = args.prompt
    start, first, usage, tokens = time.perf_counter(), None, None, 0
    try:
        with Client(args.address) as client:
            for chunk in client.generate(**kwargs):
                first = first or time.perf_counter()
                tokens += len(chunk.token_ids)
                print(chunk.text, end="", flush=True)
                if chunk.finish_reason:
                    usage = chunk.usage
    except SpecdecError as exc:
        print(f"\nerror: {exc.code.name}: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    tau = (usage.accepted_draft_tokens + usage.verify_steps) / max(usage.verify_steps, 1)
    print(f"\n[{tokens} tokens in {elapsed:.2f} s: {tokens / elapsed:.1f} tokens/s, first token "
          f"{(first - start) * 1000:.0f} ms, tau {tau:.2f}]", file=sys.stderr)
    return 0


def cmd_prepare(args) -> int:
    from specdec import models

    t = time.perf_counter()
    directory = models.local_directory(models.resolve(args.model))
    print(f"{args.model}: ready at {directory} ({time.perf_counter() - t:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    words = argv if argv is not None else sys.argv[1:]
    args = build_parser(_command_of(words)).parse_args(argv)
    args.command_line = "specdec " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.command == "serve":
        from specdec import compute

        compute.set_threads(args.threads or None, gpu=str(getattr(args, "device", "cpu")).startswith("cuda"))
    if getattr(args, "compile", False):
        os.environ["SPECDEC_COMPILE"] = "yes"  # read by every LlamaEngine this process builds
    if getattr(args, "dtype", "auto") != "auto":
        os.environ["SPECDEC_DTYPE"] = args.dtype  # read by every engine this process builds, and its children
    _logging(args.verbose)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear one-line error for what a user can fix; tracebacks with -v
        from specdec.errors import SpecdecError
        from specdec.models import ModelNotFound

        if isinstance(exc, (ModelNotFound, SpecdecError, ValueError, OSError)) and not args.verbose:
            print(f"specdec: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
