"""One `specdec serve` process (all-in-one, default models), request by request: speculation off before and after a
speculative session, on two prompts, in ms per token after the first. It is how a decode that ran ~25% slower
after a feature drafter's session in the same process was found (docs/benchmarks.md); rerun it after changes to
what the drafter or verifier does on the event loop's thread.

    .venv/bin/python bench/allinone_decode.py [extra `specdec serve` flags, e.g. --drafter-model ngram]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specdec.client import Client  # noqa: E402
from specdec.launch import ServerProcess  # noqa: E402

PROMPTS = {"P1": "Explain in a few sentences how a hash table works and why lookups are fast.",
           "P2": "Describe how a bicycle gear system works and why it helps on hills."}
ORDER = [("P1", 0), ("P2", 0), ("P1", 2), ("P2", 0), ("P1", 0), ("P2", 0)]  # (prompt, max_draft_tokens)


def main() -> int:
    with ServerProcess(None, *sys.argv[1:]) as server, Client(server.address) as client:
        for name, k in ORDER:
            first, tokens = None, 0
            for chunk in client.generate(chat=[{"role": "user", "content": PROMPTS[name]}], max_new_tokens=128,
                                         max_draft_tokens=k):
                first = first or time.perf_counter()
                tokens += len(chunk.token_ids)
            ms = 1000 * (time.perf_counter() - first) / max(1, tokens - 1)
            print(f"{name} {'off' if k == 0 else f'k={k}'}: {ms:.1f} ms per token after the first", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
