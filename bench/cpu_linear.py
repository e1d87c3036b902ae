"""The engine's projections on a CPU: F.linear (the BLAS torch was built with, MKL on x86) against oneDNN's GEMM on
a weight packed once into its blocked layout (specdec.engine.Linear, the engine's default on a CPU), for the
target's own matrices at 1 to 8 tokens: what decides whether verifying k + 1 tokens costs about one decode step.

    python bench/cpu_linear.py [--target smollm2-135m-instruct] [--tokens 1,2,4,6,8] [--json out.json]

Each matrix is timed alone, so it may sit in the CPU's caches; the whole pass streams every weight from memory
(`bench/drafter_cost.py` times that: a decode step and a k + 1-token verify). Then, for the whole pass: the
machine's copy bandwidth, and the engine's decode step under torch.profiler, with the share spent in oneDNN's GEMMs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specdec import models  # noqa: E402
from specdec.engine import Linear, LlamaEngine, Row  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def whole_pass(model, steps: int = 5) -> dict:
    """Copy bandwidth (512 MB copied, read + write) and the engine's decode step (one token after 128) profiled."""
    a = torch.empty(128 * 1024 * 1024)
    b = torch.empty_like(a)
    copy_ms = median_ms(lambda: b.copy_(a), 5)
    del a, b
    engine = LlamaEngine(model, "cpu")
    cache = engine.new_cache(1, 160)
    engine.forward(cache, [Row(0, 0, list(range(10, 138)))])
    step = lambda: engine.forward(cache, [Row(0, 128, [11])])  # noqa: E731
    step()
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    gemm_us = sum(e.self_cpu_time_total for e in events if e.key == "mkldnn::_linear_pointwise")
    weights = sum(p.numel() * 4 for p in model.parameters())
    return {"copy_gb_s": 2 * 128 * 1024 * 1024 * 4 / copy_ms / 1e6, "step_ms": total_us / steps / 1e3,
            "gemm_ms": gemm_us / steps / 1e3, "weight_gb": weights / 1e9}


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else "unknown"."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m-instruct", help="model SPEC whose matrices to time")
    parser.add_argument("--tokens", default="1,2,4,6,8", help="rows (tokens) per product, comma-separated")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per case (the median is reported)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = models.load_hf_model(args.target)
    layer = model.model.layers[0]
    matrices = {
        "qkv": torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight]),
        "o": layer.self_attn.o_proj.weight,
        "gate_up": torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]),
        "down": layer.mlp.down_proj.weight,
        "lm_head": model.lm_head.weight,
    }
    tokens = [int(n) for n in args.tokens.split(",")]
    results = []
    print(f"threads {torch.get_num_threads()}; median ms of {args.repeats} calls", flush=True)
    print(f"{'matrix':<10}{'shape':>14}{'tokens':>8}{'F.linear':>11}{'packed':>9}{'speed-up':>10}")
    for name, weight in matrices.items():
        weight = weight.detach().float().contiguous()
        packed = Linear(weight)
        if packed.weight is not None:
            print("oneDNN cannot pack on this machine (or SPECDEC_CPU_PACKED_WEIGHTS=no): both columns are F.linear")
        for n in tokens:
            x = torch.randn(n, weight.shape[1])
            plain_ms = median_ms(lambda: F.linear(x, weight), args.repeats)
            packed_ms = median_ms(lambda: packed(x), args.repeats)
            results.append({"matrix": name, "shape": list(weight.shape), "tokens": n, "f_linear_ms": round(plain_ms, 4),
                            "packed_ms": round(packed_ms, 4)})
            print(f"{name:<10}{'x'.join(map(str, weight.shape)):>14}{n:>8}{plain_ms:>11.3f}{packed_ms:>9.3f}"
                  f"{plain_ms / packed_ms:>9.2f}x", flush=True)
    summary = whole_pass(model)
    print(f"copy bandwidth (read + write) {summary['copy_gb_s']:.1f} GB/s; a decode step after 128 tokens "
          f"{summary['step_ms']:.1f} ms under the profiler, {summary['gemm_ms']:.1f} ms of it oneDNN GEMMs "
          f"({summary['gemm_ms'] / summary['step_ms']:.0%}); {summary['weight_gb']:.2f} GB of weights")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": cpu_name(), "threads": torch.get_num_threads(), "results": results, **summary},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
