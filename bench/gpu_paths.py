"""The engine's and the feature drafter's CUDA paths against the same random tiny models on the CPU, in a few seconds
and without model files (a GPU lease's first, cheapest check; `make test` runs on CPUs only): graph warm-up with a
fused drafter's layers, a tapped verify pass, greedy decoding on the device, and the drafter's batched inputs, fused
states, forced (proactive) tokens and new sessions' prompts under CUDA graphs. Prints PASS/FAIL per check and exits
1 on a failure.

    python bench/gpu_paths.py [--device cuda:0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from specdec.engine import LlamaEngine, Row  # noqa: E402
from specdec.feature_drafter import FeatureRunner  # noqa: E402
from tests.test_engine import tiny_model  # noqa: E402
from tests.test_feature_drafter import VOCAB, _model  # noqa: E402

PROMPTS = [list(range(5, 14)), list(range(20, 41)), [7, 8, 9]]


class Checks:
    def __init__(self):
        self.failed = 0

    def __call__(self, name: str, passed: bool, detail: str = "") -> None:
        self.failed += not passed
        print(f"{'PASS' if passed else 'FAIL'} {name} {detail}", flush=True)


def engine_paths(device: str, check: Checks) -> None:
    torch.manual_seed(0)
    model = tiny_model("llama", seed=3)
    last = model.config.num_hidden_layers - 1
    cpu, gpu = LlamaEngine(model), LlamaEngine(model, device, torch.float32)
    caches = []
    for engine in (cpu, gpu):
        cache = engine.new_cache(4, 64)
        engine.forward(cache, [Row(i, 0, p) for i, p in enumerate(PROMPTS)])
        caches.append(cache)
    warmed = gpu.warm_cuda_graphs(caches[1], max_rows=4, widths=(2, 4), max_kv=64, feature_layers=[[0, last]])
    captures = gpu.passes["captures"]
    check("graphs warmed with a drafter's layers", warmed > 0, f"({warmed} graphs)")
    rows = [Row(i, len(p), [11, 12], all_logits=True) for i, p in enumerate(PROMPTS)]
    want = cpu.forward_flat(caches[0], rows, hidden=[0, last])
    got = gpu.forward_flat(caches[1], rows, hidden=[0, last])
    diff = (got[0].cpu() - want[0]).abs().max().item()
    check("tapped verify pass: logits", diff < 1e-3, f"(max diff {diff:.1e})")
    check("tapped verify pass: hidden states", torch.allclose(got[2].float().cpu(), want[2], atol=1e-3))
    check("no capture on the token path after the warm-up", gpu.passes["captures"] == captures, str(dict(gpu.passes)))
    rows = [Row(i, len(p) + 2, [7]) for i, p in enumerate(PROMPTS)]
    cpu_tokens, gpu_tokens = cpu.decode_greedy(caches[0], rows, 6), gpu.decode_greedy(caches[1], rows, 6)
    check("greedy decode on the device", cpu_tokens == gpu_tokens, f"{cpu_tokens} vs {gpu_tokens}")


def drafter_paths(device: str, check: Checks) -> None:
    for taps in (None, [1, 4, 7]):  # a last-layer drafter, a fused one
        model = _model(taps=taps)
        # chains, forced (proactive) tokens, and new sessions' prompts (rows past 16 tokens: the prompt graphs, 4 + 1)
        for label, lengths, forced in (("chain", (3, 9, 6), None), ("forced tokens", (3, 9, 6), [[5, 6], [], [9]]),
                                       ("prompts", (3, 40, 25, 20, 30, 18), None)):
            seqs = [torch.randint(0, VOCAB, (n,)).tolist() for n in lengths]
            feats = [torch.randn(len(s), model.feature_width).half() for s in seqs]  # as the verifier sends them
            drafts = []
            for dev in ("cpu", device):
                runner = FeatureRunner(model, dev, torch.float32, num_slots=len(seqs) + 1, max_len=64)
                uniforms = torch.rand(len(seqs), 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
                drafts.append(runner.draft([Row(slot, 0, s) for slot, s in enumerate(seqs)], feats, 4,
                                           ([0.0, 0.7] * 3)[: len(seqs)], uniforms, 8, forced=forced)[0])
            check(f"drafts, {'fused' if taps else 'last-layer'} drafter, {label}", drafts[0] == drafts[1],
                  f"{drafts[0]} vs {drafts[1]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0", help="a CUDA device (default cuda:0)")
    args = parser.parse_args()
    if not args.device.startswith("cuda"):
        parser.error(f"--device {args.device}: these are the CUDA paths (graphs); the CPU's are `make test`'s")
    check = Checks()
    engine_paths(args.device, check)
    drafter_paths(args.device, check)
    print("all passed" if not check.failed else f"{check.failed} failed")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
