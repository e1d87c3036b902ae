"""Where the host's time goes under load: each server process's Python, sampled while many users decode.

Starts a verifier, a drafter (for a speculating mode) and a router as `specdec bench` does, warms them up, then
runs one level of `--concurrency` users while py-spy (`pip install py-spy`; not a dependency of specdec) samples
every server process. For each process it prints the CPU milliseconds per committed token (all threads: torch
work included) and, from py-spy's samples of threads holding the GIL (`--gil`), the share of the wall time that
process spent in Python with the GIL held (a process near 100% is bound by its Python, whatever its device
does) and the functions that held it longest, inclusive and self. With `--busy`, every thread that is not idle
is sampled instead (the share can pass 100%: several threads; threads blocked in a system call can count as
busy), and `--native` adds C/C++ frames (torch's dispatch, a CUDA synchronization spinning): where a process's
CPU goes when its Python does not hold the GIL. Native sampling pauses each process per sample, so the level
runs slower than unprofiled.
Writes `load_profile.json` and the raw samples (`<tier>.txt`, py-spy's collapsed stacks) under `--out`. Whatever
the sampler, it prints the round's phases each server logs when it stops (specdec.phases: the drafter's queue,
batches and verify round trips, the verifier's queue waits and ticks); `--phases-only` runs the level with no
sampler beside it, for those alone.

With `--device-trace SECONDS`, py-spy stays off and the verifier and drafter each profile SECONDS of the level on
their torch thread instead (specdec.device_trace, triggered with SIGUSR1 `--trace-after` seconds into the level):
the device's busy share (each process and both together, on one GPU), the top kernels, the CUDA runtime calls,
and the `specdec.*` spans (the verifier's ticks, the drafter's batches of drafts) with the device time of the
kernels each launched. Chrome traces and summaries land under `--out`.

    .venv/bin/python bench/load_profile.py --target /tmp/tiny-llama --concurrency 64 --out out/load-profile
    python bench/load_profile.py --target /root/m/smollm2.gguf --device cuda:0 --mode model=DRAFTER \\
        --concurrency 64 --out $OUT/load-profile
    python bench/load_profile.py ... --busy --native --out $OUT/load-profile-busy
    python bench/load_profile.py ... --device-trace 4 --out $OUT/load-profile-trace
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specdec import device_trace  # noqa: E402
from specdec.bench import (  # noqa: E402
    DEFAULT_PROMPTS,
    cpu_ms_per_token,
    cpu_seconds,
    load_prompts,
    report_phases,
    run_level,
    start_drafter_process,
    start_router_process,
    start_verifier_process,
)


def summarize_samples(path: Path, rate: int, seconds: float, top: int,
                      share_key: str = "gil_held_pct_of_wall") -> dict:
    """py-spy's collapsed stacks ("thread;frame;frame count" lines) -> the sampled share of the wall time (under
    share_key) and the top functions."""
    total, own, inclusive = 0, collections.Counter(), collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")[1:]]  # drop the thread, the line numbers
        if frames:
            own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n

    def share(counter):
        return [[name[:120], round(100 * n / max(total, 1), 1)] for name, n in counter.most_common(top)]

    return {share_key: round(100 * total / (rate * seconds), 1), "samples": total,
            "inclusive_pct": share(inclusive), "self_pct": share(own)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="target model SPEC (required unless --summarize)")
    parser.add_argument("--mode", default="off", help="off, ngram, or model=DRAFTER (as `specdec bench --modes`)")
    parser.add_argument("--device", default="cpu", help="verifier's device")
    parser.add_argument("--drafter-device", default=None, help="drafter's device (default: the verifier's)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=0, help="requests in the level (default 16 x concurrency)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--k", type=int, default=5, help="draft tokens asked per request in a speculating mode")
    parser.add_argument("--seconds", type=int, default=15, help="how long py-spy samples (from the level's start)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--busy", action="store_true",
                        help="sample every thread that is not idle, not only the one holding the GIL")
    parser.add_argument("--native", action="store_true", help="include C/C++ frames (py-spy --native)")
    parser.add_argument("--device-trace", type=float, default=0.0, metavar="SECONDS",
                        help="profile the verifier's and drafter's torch work for SECONDS instead of sampling with "
                        "py-spy (specdec.device_trace)")
    parser.add_argument("--trace-after", type=float, default=3.0,
                        help="seconds into the level the device trace starts (past the first prefills)")
    parser.add_argument("--phases-only", action="store_true",
                        help="no sampler: only the servers' phases (where a round's time goes, logged at their stop)")
    parser.add_argument("--out", help="where the results go (required unless --summarize)")
    parser.add_argument("--summarize", type=Path, metavar="FILE",
                        help="only summarize py-spy's collapsed stacks in FILE (`py-spy record -f raw`, sampled at "
                        "--rate for --seconds) and exit: e.g. a profile of a server under bench/client_loop.py")
    args = parser.parse_args()
    if args.summarize:
        summary = summarize_samples(args.summarize, args.rate, args.seconds, args.top, "sampled_pct_of_wall")
        print(json.dumps(summary, indent=1))
        return
    if not args.target or not args.out:
        parser.error("--target and --out are required (unless --summarize)")
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not args.device_trace and not args.phases_only and not Path(spy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device_trace:  # read by the servers' SIGUSR1 handler (they inherit this environment)
        os.environ["SPECDEC_DEVICE_TRACE_DIR"] = str(out.resolve())
        os.environ["SPECDEC_DEVICE_TRACE_SECONDS"] = str(args.device_trace)
    prompts = load_prompts(Path(args.prompts))
    slots = max(args.concurrency, 4)
    started = []
    try:
        verifier = start_verifier_process(args.target, args.device, slots, 2048, 0, out / "verifier.log", [args.mode])
        started.append(verifier)
        pids = {"verifier": verifier.proc.pid}
        drafter_flags = []
        if args.mode != "off":
            drafter = start_drafter_process(args.mode, args.target, args.drafter_device or args.device, slots, 0,
                                            out / "drafter.log")
            started.append(drafter)
            pids["drafter"] = drafter.proc.pid
            drafter_flags = ["--drafter", drafter.address]
        router = start_router_process(verifier.address, drafter_flags, args.target, out / "router.log")
        started.append(router)
        pids["router"] = router.proc.pid
        k = 0 if args.mode == "off" else args.k
        print("warming up...", flush=True)
        asyncio.run(run_level(router.address, prompts, min(4, args.concurrency), 8, 16, k))
        what = [] if args.busy else ["--gil"]
        what += ["--native"] if args.native else ["--nonblocking"]  # (native frames need the process paused)
        spies = {} if args.device_trace or args.phases_only else {
            tier: subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(args.seconds), "-r", str(args.rate),
                                    *what, "-f", "raw", "-o", str(out / f"{tier}.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for tier, pid in pids.items()}
        cpu_before = {tier: cpu_seconds(pid) for tier, pid in pids.items()}
        requests = args.requests or 16 * args.concurrency
        traced = {tier: pid for tier, pid in pids.items() if tier != "router"}
        if args.device_trace:
            print(f"{args.mode}: {args.concurrency} users, {requests} requests of {args.max_new_tokens} tokens; "
                  f"a device trace of {args.device_trace:g} s from {args.trace_after:g} s in", flush=True)
            timer = threading.Timer(args.trace_after, lambda: [os.kill(pid, signal.SIGUSR1) for pid in traced.values()])
            timer.start()
        else:
            print(f"{args.mode}: {args.concurrency} users, {requests} requests of {args.max_new_tokens} tokens; "
                  + ("phases only" if args.phases_only else f"py-spy samples the first {args.seconds:g} s"), flush=True)
        results, wall = asyncio.run(run_level(router.address, prompts, args.concurrency, requests,
                                              args.max_new_tokens, k))
        if args.device_trace:
            summaries = wait_for_summaries(out, traced, args.trace_after + args.device_trace + 120 - wall)
        tokens = sum(r.tokens for r in results)
        cpu = cpu_ms_per_token(cpu_before, pids, tokens)
        for tier, proc in spies.items():
            if proc.wait() != 0:
                print(f"py-spy on the {tier} failed: {proc.stderr.read().decode()[-400:]}", flush=True)
    finally:
        for proc in reversed(started):
            proc.stop()
    if not args.device_trace and not args.phases_only and wall < args.seconds:
        print(f"note: the level took {wall:.1f} s, less than the {args.seconds:g} s sampled: the GIL shares below are "
              "diluted by the idle tail; raise --requests", flush=True)
    report = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "mode": args.mode,
              "concurrency": args.concurrency, "tokens": tokens, "wall_s": round(wall, 2),
              "aggregate_tokens_per_s": round(tokens / wall, 1), "cpu_ms_per_token": cpu, "tiers": {}}
    print(f"aggregate {tokens / wall:.1f} tokens/s; CPU ms per token: {cpu}")
    for tier in pids:
        path = out / f"{tier}.txt"
        if not path.exists():
            continue
        key = "busy_pct_of_wall" if args.busy else "gil_held_pct_of_wall"
        summary = summarize_samples(path, args.rate, args.seconds, args.top, key)
        report["tiers"][tier] = summary
        what = "threads busy" if args.busy else "GIL held"
        print(f"\n{tier}: {what} {summary[key]}% of the wall time")
        for name, pct in summary["inclusive_pct"]:
            print(f"  {pct:5.1f}%  {name}")
        print("  self:")
        for name, pct in summary["self_pct"][:12]:
            print(f"  {pct:5.1f}%  {name}")
    print()
    report["phases"] = report_phases([out / f"{tier}.log" for tier in pids])
    if args.device_trace:
        report["device_trace"] = report_traces(out, traced, summaries, args.trace_after + args.device_trace > wall)
    (out / "load_profile.json").write_text(json.dumps(report, indent=1))


def wait_for_summaries(out: Path, traced: dict[str, int], timeout: float) -> dict[str, dict]:
    """Each traced server's summary (device_trace writes <name>-<pid>.summary.json once its trace is exported)."""
    deadline = time.monotonic() + max(timeout, 10.0)
    paths = {tier: out / f"{tier}-{pid}.summary.json" for tier, pid in traced.items()}
    while time.monotonic() < deadline and not all(p.exists() for p in paths.values()):
        time.sleep(0.5)
    missing = [tier for tier, p in paths.items() if not p.exists()]
    if missing:
        print(f"no device trace came back from {', '.join(missing)} (see its log)", flush=True)
    return {tier: json.loads(p.read_text()) for tier, p in paths.items() if p.exists()}


def report_traces(out: Path, traced: dict[str, int], summaries: dict[str, dict], outlived: bool) -> dict:
    """Prints each process's device summary and the device's busy share of the window, both processes together."""
    if outlived:
        print("note: the device trace outlasted the level, so its window holds an idle tail: raise --requests")
    for tier, summary in summaries.items():
        device = summary["device"]
        print(f"\n{tier} device trace ({summary['wall_s']} s): device busy {device['busy_pct']}% "
              f"({device['kernels']} kernels, {device['copies']['count']} copies {device['copies']['ms']} ms)")
        for name, span in summary["spans"].items():
            print(f"  span {name}: {span['count']} x {span['mean_host_ms']} ms host ({span['host_pct_of_wall']}% of "
                  f"the window), device {span['device_pct']}% of it")
        for row in summary["runtime"][:6]:
            print(f"  runtime {row['name']}: {row['count']} calls, {row['ms']} ms")
        for row in summary["device"]["top_kernels"][:6]:
            print(f"  kernel {row['ms']:9.3f} ms  {row['count']:6d} x  {row['name'][:90]}")
    shared = device_trace.shared_busy([out / f"{tier}-{pid}.trace.json" for tier, pid in traced.items()])
    if shared:
        print(f"\nthe device, all traced processes together: busy {shared['busy_pct_all']}% of the "
              f"{shared['window_ms']:.0f} ms they share (each: {shared['busy_pct_each']})")
    return {"summaries": summaries, "shared": shared}


if __name__ == "__main__":
    main()
