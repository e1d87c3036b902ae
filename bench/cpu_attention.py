"""Attention of one layer of the default target's shape on the CPU (9 query heads over 3 KV heads, head size 64), by
query width and KV length: torch's scaled_dot_product_attention in fp32 and in bf16, against the engine's own
`_attend` in bf16 (which sends a single query as two: the CPU kernel's slow path for one bf16 query).
Median microseconds; the JSON keeps them all.

    .venv/bin/python bench/cpu_attention.py --json bench/results/cpu-session14/cpu_attention.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpu_linear import median_ms  # noqa: E402  (bench/ is the script's own folder)
from specdec.engine import _attend  # noqa: E402


def median_us(fn, repeats: int) -> float:
    for _ in range(10):  # warm-up: the first calls pick kernels and allocate
        fn()
    return median_ms(fn, repeats) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="1,2,4,16", help="query tokens a row")
    p.add_argument("--kv", default="128,512,2048", help="KV lengths")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; median us")
    print(f"{'kv':>5} {'width':>5} {'sdpa fp32':>10} {'sdpa bf16':>10} {'_attend bf16':>13}")
    for kv in (int(n) for n in args.kv.split(",")):
        for width in (int(n) for n in args.widths.split(",")):
            q = torch.randn(1, 9, width, 64)
            keys, values = torch.randn(1, 3, kv, 64), torch.randn(1, 3, kv, 64)
            mask = torch.zeros(1, 1, width, kv)  # additive, as the engine's
            low = [t.to(torch.bfloat16) for t in (q, keys, values, mask)]
            row = {"kv": kv, "width": width,
                   "sdpa_fp32_us": median_us(lambda: F.scaled_dot_product_attention(
                       q, keys, values, attn_mask=mask, enable_gqa=True), args.repeats),
                   "sdpa_bf16_us": median_us(lambda: F.scaled_dot_product_attention(
                       *low[:3], attn_mask=low[3], enable_gqa=True), args.repeats),
                   "attend_bf16_us": median_us(lambda: _attend(*low), args.repeats)}
            rows.append(row)
            print(f"{kv:>5} {width:>5} {row['sdpa_fp32_us']:>10.0f} {row['sdpa_bf16_us']:>10.0f} "
                  f"{row['attend_bf16_us']:>13.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
