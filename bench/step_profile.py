"""Where one decode step's device time goes: kernels per step of the engine's pass, by name.

For each model shape (random bf16 weights: the default target's, an 8B Llama's), each engine form (CUDA graph;
torch.compile'd then graphed) and each attention variant, one session with `--kv` tokens of context:

- `replay_ms`: one graph replay, CUDA events, median of 100 (the pass alone);
- `decode_step_ms`: per token of `decode_greedy(steps=--steps)`, what speculation off runs per token (replay +
  argmax + feeding it back), synchronized wall time over the whole run, median of 5 runs;
- `kernels`: the pass run outside its graph under torch.profiler: per kernel name, launches and device
  microseconds per step (busy time), so replay_ms - busy = the gaps between kernels;
- `floor_ms`: weight bytes / measured copy bandwidth (read + write), the bandwidth floor of a batch-1 step.

Attention variants (`--attention`): `sdpa` (the engine's: masked SDPA with grouped heads), `grouped` (matmuls over
each kv head's group of query heads, masked softmax in fp32), `flex` (torch's flex_attention). Each variant's
logits are compared with `sdpa`'s.

    python bench/step_profile.py --shapes smollm2,8b --compile no,yes --json $OUT/step_profile.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_engine import copy_bandwidth, timed  # noqa: E402  (bench/ is on the path when run as a script)
from specdec import engine as engine_module  # noqa: E402
from specdec.engine import LlamaEngine, Row  # noqa: E402

T0 = time.perf_counter()
SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
}


def attend_grouped(q, keys, values, mask):
    """Each kv head's query heads as one matrix: two batched matmuls and a masked fp32 softmax, no head copies."""
    batch, heads, width, dim = q.shape
    kv_heads, kv_len = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    scores = torch.matmul(q.reshape(batch, kv_heads, group * width, dim), keys.transpose(-1, -2)).float()
    scores = scores.view(batch, kv_heads, group, width, kv_len) * dim**-0.5
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    weights = scores.softmax(-1).to(q.dtype).view(batch, kv_heads, group * width, kv_len)
    return torch.matmul(weights, values).view(batch, heads, width, dim)


_FLEX = None


def attend_flex(q, keys, values, mask):
    """torch's flex_attention (its own Triton kernel; split over the keys for a few queries), compiled on its own
    when the pass is not, the mask added as a score modification."""
    global _FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)

    def bias(score, b, h, q_index, kv_index):
        return score + mask[b, 0, q_index, kv_index]

    return _FLEX(q, keys, values, score_mod=bias, enable_gqa=True)


VARIANTS = {"sdpa": engine_module._attend, "grouped": attend_grouped, "flex": attend_flex}


def rms_norm_composed(x, weight, eps):
    """The engine's RMSNorm until the seventeenth session, composed of small ops (on CUDA: the fp32 cast, square,
    mean, add, rsqrt, multiply and cast back, then the weight), against the fused one it uses now (same bits)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


NORMS = {"fused": engine_module._rms_norm, "composed": rms_norm_composed}


def kernel_table(fn, runs: int = 10, top: int = 30) -> tuple[float, list, float]:
    """(device ms busy a run, the `top` kernels by time as [name, launches a run, us a run], all launches a run)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    per_name: dict[str, list] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_name.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.time_range.elapsed_us()
    busy = sum(v[1] for v in per_name.values()) / runs / 1000
    rows = sorted(([name[:90], n / runs, round(us / runs, 1)] for name, (n, us) in per_name.items()),
                  key=lambda r: -r[2])
    return busy, rows[:top], sum(n for n, _ in per_name.values()) / runs


def floor_ms(weight_bytes: int) -> float:
    return weight_bytes / copy_bandwidth(weight_bytes) * 1000


@torch.inference_mode()
def run_shape(name: str, forms: list[str], variants: list[str], kv: int, steps: int, out: dict,
              norms: tuple[str, ...] = ("fused",)) -> None:
    import transformers

    config = transformers.LlamaConfig(**SHAPES[name])
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = transformers.LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    model.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out[name] = {"weight_gb": round(weight_bytes / 1e9, 3), "floor_ms": round(floor_ms(weight_bytes), 4)}
    print(f"{time.perf_counter() - T0:.0f}s", name, out[name], flush=True)
    reference = None
    for form, variant, norm in itertools.product(forms, variants, norms):
        key = f"{form}/{variant}" + ("" if norm == "fused" else f"/{norm}-norm")
        try:
            engine_module._attend = VARIANTS[variant]
            engine_module._rms_norm = NORMS[norm]
            started = time.perf_counter()
            engine = LlamaEngine(model, "cuda", torch.bfloat16, cuda_graphs=True, compile=form == "compiled")
            cache = engine.new_cache(2, 2048)
            engine.forward(cache, [Row(0, 0, list(range(100, 100 + kv)))])
            rows = [Row(0, kv, [7])]
            logits = engine.forward(cache, rows)[0]
            if reference is None:
                reference = logits
            graph, _, _ = engine._graphs._loaded(cache, rows, engine._graphs.floor, kv + 1)
            entry = {"warmup_s": round(time.perf_counter() - started, 1),
                     "max_logit_diff_vs_first": float((logits - reference).abs().max()),
                     "same_argmax_as_first": bool(logits.argmax() == reference.argmax()),
                     "replay_ms": round(timed(graph.replay, 100), 4)}
            engine.decode_greedy(cache, rows, steps)  # captures the decode graph for this kv bucket
            torch.cuda.synchronize()
            walls = []
            for _ in range(5):
                began = time.perf_counter()
                engine.decode_greedy(cache, rows, steps)
                walls.append((time.perf_counter() - began) * 1000 / steps)
            entry["decode_step_ms"] = round(statistics.median(walls), 4)
            _, buffers, _ = engine._graphs._loaded(cache, rows, engine._graphs.floor, kv + 1)
            length = min(engine_module._bucket(kv + 1, 128), 2048)
            busy, table, launches = kernel_table(lambda: engine._graphs.step(cache, *buffers, length))
            entry["busy_ms_outside_graph"] = round(busy, 4)
            entry["kernels_per_step"] = launches
            entry["kernels"] = table
            out[name][key] = entry
            figures = {k: v for k, v in entry.items() if k != "kernels"}
            print(f"{time.perf_counter() - T0:.0f}s", key, json.dumps(figures), flush=True)
            for row in table[:20]:
                print("   ", row, flush=True)
            del engine, cache, graph
            torch.cuda.empty_cache()
        except Exception:
            out[name][key] = {"error": traceback.format_exc()}
            traceback.print_exc()
        finally:
            engine_module._attend = VARIANTS["sdpa"]
            engine_module._rms_norm = NORMS["fused"]
    del model
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2,8b", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--compile", default="no,yes", help="engine forms: no (CUDA graph), yes (compiled too)")
    parser.add_argument("--attention", default="sdpa,grouped", help="attention variants: " + ", ".join(VARIANTS))
    parser.add_argument("--norm", default="fused", help="RMSNorm forms: " + ", ".join(NORMS))
    parser.add_argument("--kv", type=int, default=200, help="tokens of context before the step")
    parser.add_argument("--steps", type=int, default=64, help="steps of each decode_greedy run")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    forms = [{"no": "graphed", "yes": "compiled"}[f] for f in args.compile.split(",")]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "kv": args.kv}
    for shape in args.shapes.split(","):
        run_shape(shape, forms, args.attention.split(","), args.kv, args.steps, out, tuple(args.norm.split(",")))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
