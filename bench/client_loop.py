"""A client that keeps one request in flight against a running router for a while and prints its tokens/s: the
load to profile a server under (e.g. py-spy on an all-in-one `specdec serve`, docs/benchmarks.md):

    specdec serve --port 50777 --metrics-port 0 &
    python bench/client_loop.py 127.0.0.1:50777 --seconds 40 &
    py-spy record -p <serve's pid> -d 30 -r 200 -f raw -o spy.raw --nonblocking
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specdec import Client  # noqa: E402

PROMPTS = Path(__file__).resolve().parent / "prompts" / "chat.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address", help="the router, host:port")
    parser.add_argument("--seconds", type=float, default=40.0, help="how long to keep asking")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--off", action="store_true", help="ask for no speculation (max_draft_tokens 0)")
    parser.add_argument("--prompts", type=Path, default=PROMPTS, help="JSONL of {messages: [...]}")
    args = parser.parse_args()
    chats = [json.loads(line)["messages"] for line in args.prompts.read_text().splitlines() if line.strip()]
    tokens, requests, started = 0, 0, time.time()
    with Client(args.address) as client:
        while time.time() - started < args.seconds:
            for chunk in client.generate(chat=chats[requests % len(chats)], max_new_tokens=args.max_new_tokens,
                                         max_draft_tokens=0 if args.off else None):
                tokens += len(chunk.token_ids)
            requests += 1
    print(f"{'off' if args.off else 'speculating'}: {tokens / (time.time() - started):.1f} tokens/s over {requests} "
          "requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
