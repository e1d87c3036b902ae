"""GPU engine check and timings, in one call (see ../shared/GPU.md for the method).

1. Parity: CUDA-graphed passes against eager passes of the same engine (bf16): max |logit diff| and argmax
   agreement for decode (1 token) and verify (6 tokens) at batch 1 and 4.
2. Step time (CUDA events, median of 50): default target, batch 1 and 64, 1 and 6 tokens, eager vs graphed;
   the prefill of 1 and of 4 prompts of 60 tokens (graphed: a wide bucket); transformers' eager forward for
   reference.
3. An 8B-shaped Llama (random bf16 weights): one graphed decode step at batch 1 against weight bytes / measured
   copy bandwidth.

    python bench/gpu_engine.py --model /root/m/model.gguf --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch


def timed(fn, runs: int = 50) -> float:
    """Median milliseconds of fn() with CUDA events, after warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rows_for(batch: int, width: int, base: int, slots: list[int]):
    from specdec.engine import Row

    return [Row(slots[b], base + 7 * b, list(range(100 + b, 100 + b + width)), True) for b in range(batch)]


def part_parity_and_timing(spec: str, results: dict, compile_too: bool = False) -> None:
    from specdec import models
    from specdec.engine import LlamaEngine, Row

    hf = models.load_hf_model(spec, device="cuda", dtype=torch.bfloat16)
    eager = LlamaEngine(hf, "cuda", torch.bfloat16, cuda_graphs=False)
    graphed = LlamaEngine(hf, "cuda", torch.bfloat16, cuda_graphs=True, compile=False)
    variants = [("graphed", graphed)]
    if compile_too:
        variants.append(("compiled", LlamaEngine(hf, "cuda", torch.bfloat16, cuda_graphs=True, compile=True)))
    parity = {}
    for name, other in variants:
        for batch in (1, 4):
            caches = [e.new_cache(64, 1024) for e in (eager, other)]
            for engine, cache in zip((eager, other), caches):
                engine.forward(cache, [Row(b, 0, list(range(10 + b, 10 + b + 300 + 7 * b))) for b in range(batch)])
            for width in (1, 6):
                rows = rows_for(batch, width, 300, list(range(batch)))
                a = torch.cat(eager.forward(caches[0], rows))
                started = time.perf_counter()
                b = torch.cat(other.forward(caches[1], rows))
                parity[f"{name}_batch{batch}_width{width}"] = {
                    "max_abs_diff": float((a - b).abs().max()),
                    "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
                    "first_call_s": round(time.perf_counter() - started, 1),  # capture (and compilation)
                }
                # a fused feature drafter's pass: three layers' outputs side by side (graphs captured for the list)
                taps = [2, eager.shape.num_layers // 2, eager.shape.num_layers - 1]
                _, _, ha = eager.forward_flat(caches[0], rows, hidden=taps)
                lb, _, hb = other.forward_flat(caches[1], rows, hidden=taps)
                parity[f"{name}_batch{batch}_width{width}"].update({
                    "taps_hidden_max_rel_diff": float((ha.float() - hb.float()).abs().max() / ha.float().abs().max()),
                    "taps_logits_vs_plain_pass_max_abs_diff": float((lb - b).abs().max()),
                })
            print(json.dumps(parity), flush=True)
        # a draft tree's verify pass (4x4, 5 deep: 68 nodes and the root, tree attention), one row and two
        parents = [-1] * 4 + [p for level in range(4) for p in (4 * level + i // 4 for i in range(16))]
        visible = [[0]]
        for i, parent in enumerate(parents):
            visible.append(visible[parent + 1] + [i + 1])
        for batch in (1, 2):
            tree_rows = [Row(b, 300 + 7 * b, list(range(500, 500 + len(parents) + 1)), True, tree_base=300 + 7 * b,
                             visible=visible) for b in range(batch)]
            a = torch.cat(eager.forward(caches[0], tree_rows))
            started = time.perf_counter()
            b = torch.cat(other.forward(caches[1], tree_rows))
            parity[f"{name}_tree68_batch{batch}"] = {
                "max_abs_diff": float((a - b).abs().max()),
                "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
                "first_call_s": round(time.perf_counter() - started, 1),
                "graphed_ms": round(timed(lambda: other.forward(caches[1], tree_rows), runs=20), 3),
                "eager_ms": round(timed(lambda: eager.forward(caches[0], tree_rows), runs=20), 3),
            }
        print(json.dumps(parity), flush=True)
    results["parity_graph_vs_eager_bf16"] = parity
    print(json.dumps(parity), flush=True)

    timing = {}
    for batch in (1, 64):
        for width in (1, 6):
            for name, engine in (("eager", eager), *variants):
                cache = engine.new_cache(batch, 1024)
                engine.forward(cache, [Row(b, 0, list(range(200))) for b in range(batch)])
                rows = rows_for(batch, width, 200, list(range(batch)))
                for r in rows:
                    r.start = 200
                timing[f"{name}_batch{batch}_width{width}_ms"] = round(timed(lambda: engine.forward(cache, rows)), 3)
                del cache
    for prompts in (1, 4):
        for name, engine in (("eager", eager), *variants):
            cache = engine.new_cache(prompts, 1024)
            rows = [Row(b, 0, list(range(100, 160))) for b in range(prompts)]
            timing[f"{name}_prefill{prompts}x60_ms"] = round(timed(lambda: engine.forward(cache, rows)), 3)
            del cache
    ids = torch.arange(100, 300, device="cuda")[None]
    with torch.inference_mode():
        out = hf(ids, use_cache=True)
        past = out.past_key_values
        step = torch.tensor([[5]], device="cuda")
        timing["transformers_eager_batch1_width1_ms"] = round(
            timed(lambda: hf(step, past_key_values=past, use_cache=True), runs=20), 3)
    results["step_ms_default_target"] = timing
    print(json.dumps(timing), flush=True)
    del eager, graphed, variants, hf
    torch.cuda.empty_cache()


def copy_bandwidth(nbytes: int) -> float:
    """Bytes read + written per second by a device copy of nbytes (CUDA events): what a batch-1 step that streams
    that many bytes of weights is bound by."""
    big = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(big)
    copy_ms = timed(lambda: dst.copy_(big), runs=20)
    return 2 * big.numel() * 2 / (copy_ms / 1000)


def part_8b(results: dict, compile_too: bool = False) -> None:
    import transformers

    from specdec.engine import LlamaEngine, Row

    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
    )
    start = time.perf_counter()
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = transformers.LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    model.eval()
    engine = LlamaEngine(model, "cuda", torch.bfloat16, cuda_graphs=True, compile=False)
    compiled = LlamaEngine(model, "cuda", torch.bfloat16, cuda_graphs=True, compile=True) if compile_too else None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    cache = engine.new_cache(2, 1024)
    engine.forward(cache, [Row(0, 0, list(range(128)))])
    rows = [Row(0, 128, [7], True)]
    step_ms = timed(lambda: engine.forward(cache, rows))
    compiled_ms = None
    if compiled is not None:
        compiled.forward(cache, [Row(0, 0, list(range(128)))])
        compiled_ms = timed(lambda: compiled.forward(cache, rows))
    bandwidth = copy_bandwidth(weight_bytes)
    floor_ms = weight_bytes / bandwidth * 1000
    results["llama_8b_shape"] = {
        "weight_gb": round(weight_bytes / 1e9, 2), "decode_batch1_graphed_ms": round(step_ms, 3),
        "decode_batch1_compiled_graphed_ms": compiled_ms and round(compiled_ms, 3),
        "copy_bandwidth_tb_s": round(bandwidth / 1e12, 2), "floor_ms": round(floor_ms, 3),
        "ratio_to_floor": round(min(step_ms, compiled_ms or step_ms) / floor_ms, 2), "setup_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(results["llama_8b_shape"]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="target SPEC (the staged GGUF file)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd, graphed engine")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    parts = [lambda: part_parity_and_timing(args.model, results, args.compile)]
    if not args.skip_8b:
        parts.append(lambda: part_8b(results, args.compile))
    for part in parts:
        try:
            part()
        except Exception:
            results.setdefault("errors", []).append(traceback.format_exc())
            traceback.print_exc()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_engine.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
