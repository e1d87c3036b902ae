"""`make demo`: start the all-in-one server, stream one chat generation, print its speed, stop the server.

Runs the same prompt with speculation off, then on (default drafter), so the two speeds sit side by side.
"""

from __future__ import annotations

import sys
import time

from specdec.client import Client
from specdec.launch import ServerProcess

PROMPT = "Explain in a few sentences how a hash table works and why lookups are fast."


def _run(client: Client, label: str, max_draft_tokens: int | None) -> None:
    print(f"\n--- {label} ---", flush=True)
    start = time.perf_counter()
    first = None
    tokens = 0
    for chunk in client.generate(chat=[{"role": "user", "content": PROMPT}], max_new_tokens=128,
                                 max_draft_tokens=max_draft_tokens):
        first = first or time.perf_counter()
        tokens += len(chunk.token_ids)
        print(chunk.text, end="", flush=True)
        usage = chunk.usage
    elapsed = time.perf_counter() - start
    tau = (usage.accepted_draft_tokens + usage.verify_steps) / max(usage.verify_steps, 1)
    print(f"\n[{label}] {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.1f} tokens/s; "
          f"first token {1000 * (first - start):.0f} ms; mean accepted length tau {tau:.2f} "
          f"({usage.accepted_draft_tokens}/{usage.draft_tokens} draft tokens accepted)", flush=True)


def main() -> int:
    print("starting `specdec serve` (router + drafter + verifier, default models)...", flush=True)
    with ServerProcess(None) as server:
        print(f"serving on {server.address}", flush=True)
        with Client(server.address) as client:
            print(f"prompt: {PROMPT}")
            # off first: in one process, a decode after a feature drafter's session ran ~25% slower on the CPU
            # (docs/benchmarks.md), which would flatter the comparison the other way round
            _run(client, "speculation off", 0)
            _run(client, "speculation on", None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
