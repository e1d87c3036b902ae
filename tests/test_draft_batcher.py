"""The drafter tier's batcher: a session opened right after another closed gets the slot the close gives back."""

from __future__ import annotations

import asyncio
import time

from drafter_service.service import DraftBatcher
from specdec.errors import Exhausted


class OneSlotDrafter:
    """A drafter with one KV slot whose close takes a while on the torch thread (it saves prefix blocks)."""

    def __init__(self):
        self.holder = None

    def open(self, session_id):
        if self.holder is not None:
            raise Exhausted("all 1 drafter KV slots are in use")
        self.holder = session_id

    def close(self, session_id):
        time.sleep(0.2)
        if self.holder == session_id:
            self.holder = None


def test_open_waits_for_closes_under_way():
    async def main():
        batcher = DraftBatcher(OneSlotDrafter())
        await batcher.open("a")
        batcher.close("a")  # never waits: the slot comes back when the torch thread is done
        await batcher.open("b")  # failed with "all 1 drafter KV slots are in use" when open did not wait
        return batcher.drafter.holder

    assert asyncio.run(main()) == "b"
