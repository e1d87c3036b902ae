"""The verifier's scheduler: gathers every session's pending work and runs it as one forward pass per tick.

A tick takes all queued prefills (ragged passes of similar prompt lengths, a few prompts each where CUDA graphs
replay them) and all queued blocks (one ragged pass: each session its own KV length and block length; draft trees in
passes of their own), verifies the blocks with `specdec.verification` (`verify` for chains, `verify_tree` for trees,
whose accepted path's KV it then moves into place), commits, and resolves each caller's future. Plain decoding is a
block of zero draft tokens, so speculation off shares the same batches. The model work runs on the process's torch
thread (specdec.compute), so the event loop keeps serving gRPC while the device computes.

This module owns admission (KV slots), block validation and commit rules; it knows nothing about gRPC.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from dataclasses import dataclass, field, replace

import torch

from specdec import compute, device_trace
from specdec.engine import TREE_PASS_ROWS, LlamaEngine, Row, tree_visibility, upload
from specdec.errors import Exhausted, InvalidInput, Unavailable
from specdec.hf_engine import TransformersEngine
from specdec.phases import PhaseTimes
from specdec.sampling import probs_from_logits, sample
from specdec.validation import check_prompt_ids
from specdec.verification import tree_depths, verify, verify_greedy, verify_tree, verify_tree_greedy
from verifier_service.prefix_cache import PrefixCache
from verifier_service.session import FINISH_LENGTH, FINISH_NONE, Session, SessionSettings

log = logging.getLogger(__name__)

_MAX_CHUNK_STEPS = 64  # most steps of one greedy decode chunk (8 fit in 10 ms on an H200)
_PROB_TOLERANCE = 1e-3  # how far a declared draft distribution may sum from 1 (float32 on the wire)


@dataclass
class DraftDistribution:
    token_ids: list[int]
    probs: list[float]


@dataclass
class StepResult:
    """What one prefill or verify step committed for a session."""

    tokens: list[int]  # committed and sent to the client (EOS excluded)
    accepted: int  # draft tokens accepted
    session: Session
    batch_rows: int = 0  # sessions in the forward pass that made it (traces, the batch-size metric)
    # with SessionSettings.return_features: float16 [n, (len(feature_layers) or 1) * hidden] on the host, the
    # target's hidden states of the committed tokens that had none (see VerifyResponse.features)
    features: torch.Tensor | None = None


@dataclass
class _Work:
    session: Session
    future: asyncio.Future
    draft_tokens: list[int] | None = None  # None = prefill
    draft_dists: list[DraftDistribution] | None = None
    draft_parents: list[int] | None = None  # a draft tree (DraftBlock.parents); None = a chain
    chunk: bool = False  # plain decode that may take several steps in one tick (see Scheduler.decode_chunk_ms)
    queued: float = field(default_factory=time.perf_counter)


class Scheduler:
    def __init__(
        self,
        engine: LlamaEngine | TransformersEngine,
        eos_ids: frozenset[int],
        max_sessions: int = 8,
        max_sequence_length: int = 2048,
        max_draft_tokens: int = 16,
        prefix_cache: PrefixCache | None = None,
        decode_chunk_ms: float = 10.0,
        max_tree_nodes: int = 128,
        decode_ahead_steps: int = 0,
    ):
        """decode_chunk_ms: when a tick holds only plain decode steps asked with chunk=True (speculation off),
        one for every open session, and nothing else is queued, it keeps decoding those sessions while another
        step fits in this many milliseconds of the tick: one hand-off and one message per chunk instead of per
        token (greedy sessions in one engine call: see _greedy_chunk). 0 = one step.
        decode_ahead_steps: greedy steps a chunk queues on the device behind its own, which the read-back of its
        tokens does not wait for and the next chunk takes up (LlamaEngine.decode_greedy's `ahead`): the device
        keeps working while the tokens go out and the next request comes in. For GPUs (on a CPU the queued steps
        run before the tokens can go out): the verifier's default there is 2 (verifier_service.app)."""
        self.engine = engine
        self.decode_ahead_steps = decode_ahead_steps
        self.decode_chunk_ms = decode_chunk_ms
        self._chunk_step_ms: float | None = None  # the last greedy chunk's pace (see _greedy_chunk)
        self.verify_passes: list[int] = []  # rows of each verify pass of the last tick (for the metrics)
        self.prefix_cache = prefix_cache
        self.vocab_size = engine.shape.vocab_size
        self.eos_ids = eos_ids
        self.max_sequence_length = min(max_sequence_length, engine.shape.max_position_embeddings)
        self.max_draft_tokens = max_draft_tokens  # a chain's length, a tree's depth
        # most tokens of a draft tree (0 = chains only): its pass is that wide
        self.max_tree_nodes = max_tree_nodes if getattr(engine, "supports_trees", False) else 0
        self.cache = engine.new_cache(max_sessions, self.max_sequence_length)
        self.sessions: dict[str, Session] = {}
        self._queue: list[_Work] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.draining = False
        self.ticks = 0
        self.last_batch_size = 0
        self.metrics = None  # specdec.telemetry.VerifierMetrics when this process serves /metrics
        # where the work's time goes (logged when the server stops): its wait for a tick, and the ticks
        self.phases = PhaseTimes()
        self._saving: set[asyncio.Task] = set()  # closed sessions whose blocks are being saved

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="verifier-scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # -- session API -----------------------------------------------------------------------------------------------
    async def open(self, settings: SessionSettings) -> StepResult:
        """Admits a session and prefills its prompt; the result carries the first token."""
        if self.draining:
            raise Unavailable("this verifier is shutting down; retry on another")
        if settings.session_id in self.sessions:
            raise InvalidInput(f"session {settings.session_id!r} is already open on this verifier")
        check_prompt_ids(settings.prompt_ids, self.vocab_size, self.max_sequence_length)
        if settings.feature_layers:
            settings = replace(settings, feature_layers=self._checked_feature_layers(settings))
        slot = self.cache.allocate()
        if slot is None:
            raise Exhausted(f"all {self.cache.num_slots} KV slots of this verifier are in use; retry later")
        max_length = min(self.max_sequence_length, len(settings.prompt_ids) + settings.max_new_tokens)
        session = Session(settings, slot, max_length, self.eos_ids)
        self.sessions[session.id] = session
        try:
            return await self._submit(_Work(session, self._new_future()))
        except BaseException:
            self.close(session.id)
            raise

    async def step(
        self,
        session_id: str,
        committed_length: int,
        draft_tokens: list[int],
        draft_dists: list[DraftDistribution] | None = None,
        chunk: bool = False,
        draft_parents: list[int] | None = None,
    ) -> StepResult:
        """Verifies a block proposed after `committed_length` tokens (an empty block is a plain decode step; with
        chunk, maybe several: see decode_chunk_ms). draft_parents: the block is a draft tree (DraftBlock.parents)."""
        session = self.sessions.get(session_id)
        if session is None:
            raise InvalidInput(f"session {session_id!r} is not open on this verifier")
        if draft_parents and draft_parents == list(range(-1, len(draft_tokens) - 1)):
            draft_parents = None  # a chain sent as a tree: verified as the chain it is
        try:
            self._check_block(session, committed_length, draft_tokens, draft_dists, draft_parents)
        except InvalidInput:
            self.close(session_id)
            raise
        # verifying fewer draft tokens never changes the output: none past what the session may still commit, and
        # none past its KV slot
        slot_room = self.cache.max_len - len(session.tokens)
        draft_tokens, draft_dists, draft_parents = _trimmed(draft_tokens, draft_dists, draft_parents,
                                                            session.draft_room, slot_room)
        return await self._submit(_Work(session, self._new_future(), draft_tokens, draft_dists or None,
                                        draft_parents or None, chunk=chunk and not draft_tokens))

    def close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        if self.prefix_cache is not None and self.prefix_cache.wants(session):
            # The copy into the prefix cache is torch work; the slot is released only after it, so no new
            # session can overwrite the KV being saved.
            task = asyncio.get_running_loop().create_task(self._save_then_release(session))
            self._saving.add(task)
            task.add_done_callback(self._saving.discard)
        else:
            self.cache.release(session.slot)

    async def _save_then_release(self, session: Session) -> None:
        try:
            await compute.run(self.prefix_cache.on_close, self.cache, session)
        except Exception:
            log.exception("saving the prefix blocks of session %s failed", session.id)
        finally:
            self.cache.release(session.slot)

    # -- internals -------------------------------------------------------------------------------------------------
    def _checked_feature_layers(self, settings: SessionSettings) -> tuple[int, ...]:
        """A session's feature_layers as this scheduler keeps them: () for the last layer alone, however asked (so
        the session keeps the graphed pass and the prefix cache's hidden states); InvalidInput for a list this
        target cannot serve."""
        layers = tuple(settings.feature_layers)
        if not settings.return_features:
            raise InvalidInput(f"feature_layers {list(layers)} without return_features: set return_features to "
                               "receive those layers' hidden states, or send no layers")
        inner_taps = getattr(self.engine, "inner_taps", None)
        if inner_taps is None:
            raise InvalidInput("feature_layers: this verifier's target runs through transformers, which returns no "
                               "hidden states: use a token-level drafter (a model or ngram)")
        try:
            return layers if inner_taps(layers) else ()
        except ValueError:
            last = self.engine.shape.num_layers - 1
            raise InvalidInput(f"feature_layers {list(layers)}: list layers of this target (0..{last}) in increasing "
                               f"order, ending with its last ({last}); or none for the last alone") from None

    def _keep_features(self, session: Session, features: torch.Tensor) -> None:
        """Keeps a session's new features [n, width] (host) for the prefix cache."""
        session.features.append(features)

    def _new_future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, work: _Work) -> StepResult:
        if work.session.finish != FINISH_NONE:
            raise InvalidInput(f"session {work.session.id!r} has already finished")
        self._queue.append(work)
        self._wakeup.set()
        return await work.future

    def _check_block(self, session, committed_length, draft_tokens, draft_dists, draft_parents=None) -> None:
        if committed_length != len(session.tokens):
            raise InvalidInput(
                f"block for session {session.id!r} follows {committed_length} tokens, but {len(session.tokens)} "
                f"are committed: roll back to the committed length of the last verdict"
            )
        if draft_parents is not None:
            self._check_tree(draft_tokens, draft_parents)
        elif len(draft_tokens) > self.max_draft_tokens:
            raise InvalidInput(
                f"block of {len(draft_tokens)} draft tokens; this verifier accepts at most {self.max_draft_tokens}"
            )
        bad = [t for t in draft_tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidInput(f"draft token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if draft_dists:
            if len(draft_dists) != len(draft_tokens):
                raise InvalidInput(
                    f"{len(draft_dists)} draft distributions for {len(draft_tokens)} draft tokens: send one per "
                    f"token, or none for point masses"
                )
            for i, (token, dist) in enumerate(zip(draft_tokens, draft_dists)):
                _check_distribution(i, token, dist, self.vocab_size)

    def _check_tree(self, draft_tokens: list[int], parents: list[int]) -> None:
        if not self.max_tree_nodes:
            raise InvalidInput("this verifier verifies draft chains only (its target runs through transformers): "
                               "send blocks without parents")
        if len(parents) != len(draft_tokens):
            raise InvalidInput(f"{len(parents)} parents for {len(draft_tokens)} draft tokens: send one per token, "
                               "or none for a chain")
        bad = next((i for i, parent in enumerate(parents) if not -1 <= parent < i), None)
        if bad is not None:
            raise InvalidInput(f"draft token {bad} has parent {parents[bad]}: a parent is an earlier token of the "
                               "block, or -1 for the newest committed token")
        if len(draft_tokens) > self.max_tree_nodes:
            raise InvalidInput(f"draft tree of {len(draft_tokens)} tokens; this verifier accepts at most "
                               f"{self.max_tree_nodes}")
        depth = max(tree_depths(parents), default=0)
        if depth > self.max_draft_tokens:
            raise InvalidInput(f"draft tree {depth} tokens deep; this verifier accepts at most "
                               f"{self.max_draft_tokens}")

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._queue = self._queue, []
            batch = [w for w in batch if not w.future.done() and w.session.id in self.sessions]
            if not batch:
                continue
            self.ticks += 1
            self.last_batch_size = len(batch)
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            for work in batch:
                self.phases.add("prefill_queue" if work.draft_tokens is None else "block_queue", started - work.queued)
            self.phases.count("tick_rows", len(batch))
            has_prefill = any(w.draft_tokens is None for w in batch)
            self.phases.count("ticks_with_prefills", has_prefill)

            def deliver(work: _Work, result: StepResult) -> None:  # from the torch thread, before the tick ends
                loop.call_soon_threadsafe(_resolve, work.future, result)

            try:
                results = await compute.run_timed(self.phases, "tick", device_trace.traced("verifier.tick", self._tick),
                                                  batch, deliver)
            except Exception as exc:  # a failed pass fails its sessions, never the scheduler
                log.exception("forward pass failed for %d sessions", len(batch))
                for work in batch:
                    if not work.future.done():
                        work.future.set_exception(exc)
                continue
            ended = self.phases.since("tick", started)
            if has_prefill:  # a tick's tail, split out: the ticks holding prefills
                self.phases.add("tick_with_prefill", ended - started)
            for work, result in zip(batch, results):
                _resolve(work.future, result)
            if self.metrics is not None:  # once per tick, never per token
                self.metrics.record_tick(
                    [r.batch_rows for w, r in zip(batch, results) if w.draft_tokens is None],
                    [(len(w.draft_tokens), r.accepted) for w, r in zip(batch, results) if w.draft_tokens is not None],
                    self.verify_passes,
                )

    def _tick(self, batch: list[_Work], deliver=None) -> list[StepResult]:
        """Runs on the worker thread: the prefills (see _prefill), then one pass for the blocks. deliver(work,
        result), when given, hands a prefill its result as soon as its pass is done."""
        started = time.perf_counter()
        results: dict[int, StepResult] = {}
        prefills = [(i, w) for i, w in enumerate(batch) if w.draft_tokens is None]
        blocks = [(i, w) for i, w in enumerate(batch) if w.draft_tokens is not None]
        if prefills:
            with device_trace.annotate("verifier.prefill"):
                for (i, w), res in zip(prefills, self._prefill([w for _, w in prefills], deliver)):
                    results[i] = res
        self.verify_passes = []
        # A chunk (several steps in one tick) only when every open session is in this tick: a chunk of some of
        # them keeps the others, whose requests arrive a moment later, out of its passes (measured: the whole
        # stack on an H200 at 64 users made 1,509-1,684 tokens/s that way against 2,266-2,307 one step a tick)
        chunk = not prefills and len(blocks) == len(self.sessions) and all(w.chunk for _, w in blocks)
        if blocks and chunk and all(self._greedy_chunk_ok(w) for _, w in blocks):
            with device_trace.annotate("verifier.decode_chunk"):
                for (i, _), res in zip(blocks, self._greedy_chunk([w for _, w in blocks])):
                    results[i] = res
        elif blocks:
            for group in self._passes(blocks):
                with device_trace.annotate("verifier.verify"):
                    for (i, w), res in zip(group, self._verify([w for _, w in group])):
                        results[i] = res
                self.verify_passes.append(len(group))
            if chunk:
                self._decode_chunk(blocks, results, started)
        return [results[i] for i in range(len(batch))]

    def _passes(self, blocks: list[tuple[int, _Work]]) -> list[list[tuple[int, _Work]]]:
        """The verify passes of a tick. One pass pads every row to the widest block, which a GPU pays little for at
        these sizes but a CPU pays in full: there, plain decode rows (1 token) run apart from draft blocks (k + 1),
        or one speculative session makes every decoding session of the tick compute k + 1 tokens (measured: 8 users
        with one speculating at 37.5 tokens/s against 42.1 with none). Draft trees (up to ~70 tokens a row) run in
        passes of their own, a few rows each: chains padded to a tree's width would cost every session of the tick,
        and only passes of few tree rows replay as CUDA graphs (engine.TREE_PASS_ROWS). On a GPU, trees narrow
        enough for the chains' graphs (LlamaEngine.graph_width: 16 tokens, a 2x2 tree 4 deep) verify in the tick's
        one pass with them: 64 sessions' trees took 16 passes a tick otherwise."""
        fits = getattr(self.engine, "graph_width", 0) if self.engine.device.type != "cpu" else 0
        trees = [b for b in blocks if b[1].draft_parents is not None and len(b[1].draft_tokens) + 1 > fits]
        blocks = [b for b in blocks if b[1].draft_parents is None or len(b[1].draft_tokens) + 1 <= fits]
        tree_passes = [trees[i : i + TREE_PASS_ROWS] for i in range(0, len(trees), TREE_PASS_ROWS)]
        plain = [b for b in blocks if not b[1].draft_tokens]
        drafted = [b for b in blocks if b[1].draft_tokens]
        if self.engine.device.type != "cpu" or not plain or not drafted:
            return [blocks] * bool(blocks) + tree_passes
        return [plain, drafted] + tree_passes

    def _another_step(self, started: float, done: int) -> bool:
        """A chunk's rule, after `done` steps of a tick that began at `started`: one more while nothing else is
        queued and, at the pace so far, it ends within decode_chunk_ms."""
        elapsed_ms = (time.perf_counter() - started) * 1e3
        return not self._queue and elapsed_ms * (done + 1) / done <= self.decode_chunk_ms

    def _greedy_chunk_ok(self, work: _Work) -> bool:
        settings = work.session.settings
        return settings.sampling.greedy and not settings.return_features and hasattr(self.engine, "decode_greedy")

    def _greedy_chunk(self, works: list[_Work]) -> list[StepResult]:
        """A tick of greedy plain decode steps only (speculation off): steps while another fits in
        decode_chunk_ms and no other work is queued (the rule of _decode_chunk), up to what the session nearest
        its length limit may take, in one engine call that feeds each argmax back on the device
        (LlamaEngine.decode_greedy). Tokens past a session's EOS are dropped. The same tokens as one step per
        tick (tested), without the host between steps."""
        started = time.perf_counter()

        def more(done: int) -> bool:  # asked before each step after the first
            return self._another_step(started, done)

        # A bound for the run, not its length; but on a GPU it picks the graph's KV-length bucket, and every step
        # attends over the whole bucket, so it is kept near what fits in decode_chunk_ms at the last chunk's pace
        # (with 64 steps of room, a session at 200 tokens attended over 512 keys where 256 would do).
        room = min(_MAX_CHUNK_STEPS, *(w.session.max_length - len(w.session.tokens) for w in works))
        if self._chunk_step_ms:
            room = min(room, int(self.decode_chunk_ms / self._chunk_step_ms) + 2)
        rows = [Row(w.session.slot, w.session.kv_length, [w.session.tokens[-1]]) for w in works]
        ahead = 0 if self._queue else self.decode_ahead_steps  # (queued work would wait for those steps)
        tokens = self.engine.decode_greedy(self.cache, rows, room, more, ahead=ahead)
        steps = len(tokens[0])
        self._chunk_step_ms = (time.perf_counter() - started) * 1e3 / steps
        self.verify_passes = [len(works)] * steps
        out = []
        for work, row_tokens in zip(works, tokens):
            session, committed = work.session, []
            for token in row_tokens:
                if session.finish != FINISH_NONE:
                    break
                committed += session.commit([token])
                session.stats.record_block(0, 0)
            out.append(StepResult(committed, 0, session, len(works)))
        return out

    def _decode_chunk(self, blocks: list[tuple[int, _Work]], results: dict[int, StepResult], started: float) -> None:
        """More plain decode steps for a tick of chunked decodes only, while one more fits in decode_chunk_ms and
        no other work is queued (queued work waits for this tick: it must not wait long). Each step is the same
        `_verify` of an empty block, so the tokens and the random draws are those of one step per tick."""
        steps = 1
        while self._another_step(started, steps):
            live = [(i, w) for i, w in blocks
                    if results[i].session.finish == FINISH_NONE and w.session.id in self.sessions]
            if not live:
                return
            for (i, w), res in zip(live, self._verify([w for _, w in live])):
                results[i] = StepResult(results[i].tokens + res.tokens, 0, res.session, res.batch_rows)
            self.verify_passes.append(len(live))
            steps += 1

    def _prefill(self, works: list[_Work], deliver=None) -> list[StepResult]:
        """Rows of one pass are padded to its longest row, so a prefix-cache hit's short tail run with a cold prompt
        would cost a whole prefill and wait for it (measured on CPU: 1.17 s instead of 0.14 s). So prefills run
        shortest first, in passes of rows within 2x of each other's length, and each result is delivered as soon
        as its own pass is done."""
        cache = self.prefix_cache
        # sessions that want hidden states restore only blocks cached with those of their layers (and get them back)
        starts, restored = [], []
        for w in works:
            start, rows = 0, None
            if cache and w.session.settings.return_features:
                start, rows = cache.restore_with_features(self.cache, w.session.slot, w.session.tokens,
                                                          w.session.settings.feature_layers)
            elif cache:
                start = cache.restore(self.cache, w.session.slot, w.session.tokens)
            starts.append(start)
            restored.append(rows)
        rows = [Row(w.session.slot, start, list(w.session.tokens[start:])) for w, start in zip(works, starts)]
        out: list[StepResult | None] = [None] * len(works)
        for group in _length_groups([len(row.tokens) for row in rows], getattr(self.engine, "graphed_prefill", None)):
            group_rows = [rows[i] for i in group]
            features = [None] * len(group)
            wanting = [works[i].session.settings for i in group if works[i].session.settings.return_features]
            if wanting:
                layers = _pass_layers(wanting)
                flat, sizes, hidden = self.engine.forward_flat(self.cache, group_rows, hidden=layers or True)
                logits = flat.split(sizes)
                hidden = hidden.to("cpu", torch.float16).split([len(r.tokens) for r in group_rows])
                for j, (i, h) in enumerate(zip(group, hidden)):
                    settings = works[i].session.settings
                    if settings.return_features:
                        own = _own_columns(h, layers, settings.feature_layers)
                        features[j] = own if restored[i] is None else torch.cat((restored[i], own))
            else:
                logits = self.engine.forward(self.cache, group_rows)
            for i, row_logits, row_features in zip(group, logits, features):
                session = works[i].session
                if row_features is not None:
                    self._keep_features(session, row_features)
                session.stats.cached_prompt_tokens = starts[i]
                if cache:
                    cache.after_prefill(self.cache, session)
                probs = probs_from_logits(row_logits[-1].double(), session.settings.sampling)
                _, uniform = session.uniforms(0)
                token = int(sample(probs, uniform[0]))
                out[i] = StepResult(session.commit([token]), 0, session, len(group), row_features)
                if deliver is not None:
                    deliver(works[i], out[i])
        return out

    def _verify(self, works: list[_Work]) -> list[StepResult]:
        rows = [Row(w.session.slot, w.session.kv_length, [w.session.tokens[-1], *w.draft_tokens], True)
                if w.draft_parents is None else _tree_row(w.session, w.draft_tokens, w.draft_parents) for w in works]
        wants = [w.session.settings.return_features for w in works]
        layers = _pass_layers([w.session.settings for w, want in zip(works, wants) if want])
        # [sum of (n + 1), vocab], on the engine's device; with features, the hidden states of the same positions
        flat, sizes, *hidden = self.engine.forward_flat(self.cache, rows,
                                                        hidden=(layers or True) if any(wants) else False)
        offsets = [0, *itertools.accumulate(sizes[:-1])]  # where each row starts in `flat`
        # Greedy rows with point-mass drafts need only the target's argmax: k + 1 integers per row instead of
        # dense distributions (verify_greedy gives the same verdicts as verify; tested).
        is_greedy = [w.session.settings.sampling.greedy and not w.draft_dists for w in works]
        greedy = [i for i, w in enumerate(works) if is_greedy[i] and w.draft_parents is None]
        sampled = [i for i, w in enumerate(works) if not is_greedy[i] and w.draft_parents is None]
        # per row: the accepted draft tokens (indices into its block, root to leaf) and the token after them
        verdicts: dict[int, tuple[list[int], int]] = {}
        if greedy:
            chains = self._verify_greedy([works[i] for i in greedy], flat, sizes, greedy)
            verdicts.update((i, (list(range(n)), token)) for i, (n, token) in zip(greedy, chains))
        if sampled:
            logits = flat.split(sizes)
            chains = self._verify_sampled([works[i] for i in sampled], [logits[i] for i in sampled])
            verdicts.update((i, (list(range(n)), token)) for i, (n, token) in zip(sampled, chains))
        for i, work in enumerate(works):
            if work.draft_parents is not None:
                verdicts[i] = self._verify_tree(work, flat[offsets[i] : offsets[i] + sizes[i]], is_greedy[i])
        self._move_accepted_paths(works, verdicts)
        features = [None] * len(works)
        if hidden:  # one copy to the host for the tick: the rows of each verdict's committed tokens
            keep = [(b, [offsets[b]] + [offsets[b] + j + 1 for j in verdicts[b][0]])
                    for b in range(len(works)) if wants[b]]
            index = torch.tensor([i for _, picked in keep for i in picked], device=hidden[0].device)
            rows_out = hidden[0][index].to("cpu", torch.float16).split([len(picked) for _, picked in keep])
            for (b, _), h in zip(keep, rows_out):
                features[b] = _own_columns(h, layers, works[b].session.settings.feature_layers)
                self._keep_features(works[b].session, features[b])
        out = []
        for b, work in enumerate(works):
            session, (path, next_token) = work.session, verdicts[b]
            committed = session.commit([*(work.draft_tokens[j] for j in path), next_token])
            depth = None if work.draft_parents is None else max(tree_depths(work.draft_parents), default=0)
            session.stats.record_block(len(work.draft_tokens), len(path), depth)
            if session.finish == FINISH_NONE and len(session.tokens) >= session.max_length:
                session.finish = FINISH_LENGTH
            out.append(StepResult(committed, len(path), session, len(works), features[b]))
        return out

    def _verify_tree(self, work: _Work, logits: torch.Tensor, greedy: bool) -> tuple[list[int], int]:
        """One draft tree's verdict from its row's logits [n + 1, vocab] (specdec.verification.verify_tree)."""
        if greedy:
            verdict = verify_tree_greedy(logits.argmax(-1).tolist(), work.draft_tokens, work.draft_parents)
        else:
            n = len(work.draft_tokens)
            target_probs = probs_from_logits(logits.double(), work.session.settings.sampling)
            draft_probs = torch.zeros(n, self.vocab_size, dtype=torch.float64)
            _fill_draft_probs(draft_probs, work.draft_tokens, work.draft_dists)
            accept_u, sample_u = work.session.uniforms(n)
            verdict = verify_tree(target_probs, work.draft_tokens, work.draft_parents, draft_probs.to(logits.device),
                                  accept_u.to(logits.device), sample_u.to(logits.device))
        return verdict.path, verdict.next_token

    def _move_accepted_paths(self, works: list[_Work], verdicts: dict[int, tuple[list[int], int]]) -> None:
        """Draft trees' accepted nodes wrote their KV at their block index: move each to where its token sits in
        the committed sequence (one indexed copy per layer for the whole pass)."""
        slots, sources, targets = [], [], []
        for b, work in enumerate(works):
            if work.draft_parents is None:
                continue
            first = work.session.kv_length + 1  # the KV index of block token 0 (the root is at kv_length)
            for depth, node in enumerate(verdicts[b][0]):
                if node != depth:
                    slots.append(work.session.slot)
                    sources.append(first + node)
                    targets.append(first + depth)
        if slots:  # (only an engine that takes trees gets here: transformers' caches have no move)
            self.cache.move(slots, sources, targets)

    def _verify_greedy(
        self,
        works: list[_Work],
        flat: torch.Tensor,  # [sum of (n + 1) over all rows of the pass, vocab]
        sizes: list[int],  # n + 1 of every row of the pass
        picked: list[int],  # the rows of the pass that `works` are
    ) -> list[tuple[int, int]]:
        """A constant number of tensor ops per tick, whatever the batch: one argmax over the whole pass, one gather
        into [rows, k + 1] (padding repeats a row's last position), one host copy of the drafts, one sync. With no
        drafts in the pass (decode steps, a chunk's every step), just the argmax and one copy."""
        dev = flat.device
        argmax = flat.argmax(-1)  # [sum of (n + 1)]
        offsets = [0, *itertools.accumulate(sizes[:-1])]  # where each row of the pass starts in `flat`
        k = max(len(w.draft_tokens) for w in works)
        if k == 0:  # plain decode steps: the argmax is the verdict; one kernel and one copy instead of ~10 and two
            tokens = argmax.tolist()
            return [(0, tokens[offsets[i]]) for i in picked]
        index = torch.tensor([[offsets[i] + min(j, sizes[i] - 1) for j in range(k + 1)] for i in picked])
        draft_tokens = torch.tensor([w.draft_tokens + [0] * (k - len(w.draft_tokens)) for w in works],
                                    dtype=torch.long).view(len(works), k)
        draft_lens = torch.tensor([len(w.draft_tokens) for w in works])
        verdict = verify_greedy(argmax[upload(index, dev)], upload(draft_tokens, dev), upload(draft_lens, dev))
        return list(zip(verdict.num_accepted.tolist(), verdict.next_tokens.tolist()))  # one device sync

    def _verify_sampled(self, works: list[_Work], logits: list[torch.Tensor]) -> list[tuple[int, int]]:
        batch, k, vocab = len(works), max(len(w.draft_tokens) for w in works), self.vocab_size
        dev = logits[0].device
        # float64: the acceptance test compares probabilities, and the batch is small
        target_probs = torch.zeros(batch, k + 1, vocab, dtype=torch.float64, device=dev)
        draft_probs = torch.zeros(batch, k, vocab, dtype=torch.float64)
        draft_tokens = torch.zeros(batch, k, dtype=torch.long)
        draft_lens = torch.zeros(batch, dtype=torch.long)
        accept_u = torch.zeros(batch, k, dtype=torch.float64)
        sample_u = torch.zeros(batch, dtype=torch.float64)
        for b, (work, row_logits) in enumerate(zip(works, logits)):
            n = len(work.draft_tokens)
            target_probs[b, : n + 1] = probs_from_logits(row_logits.double(), work.session.settings.sampling)
            if n:
                draft_tokens[b, :n] = torch.tensor(work.draft_tokens)
                _fill_draft_probs(draft_probs[b], work.draft_tokens, work.draft_dists)
            draft_lens[b] = n
            accept_u[b, :n], sample_u[b : b + 1] = work.session.uniforms(n)
        verdict = verify(
            target_probs, draft_tokens.to(dev), draft_probs.to(dev), draft_lens.to(dev), accept_u.to(dev),
            sample_u.to(dev),
        )
        return list(zip(verdict.num_accepted.tolist(), verdict.next_tokens.tolist()))


def _trimmed(tokens: list[int], dists, parents: list[int] | None, depth_room: int, node_room: int):
    """(tokens, dists, parents) cut to what can matter: a chain to depth_room tokens; a tree to its nodes at most
    depth_room deep, then its first node_room (parents come first, so both cuts leave a tree; and a sampled node's
    siblings are cut only after it, which keeps verify_tree lossless)."""
    if parents is None:
        n = min(len(tokens), depth_room)
        return tokens[:n], dists[:n] if dists else dists, None
    keep = [i for i, d in enumerate(tree_depths(parents)) if d <= depth_room][:node_room]
    if len(keep) == len(tokens):
        return tokens, dists, parents
    renumbered = {old: new for new, old in enumerate(keep)}
    return ([tokens[i] for i in keep], [dists[i] for i in keep] if dists else dists,
            [renumbered[parents[i]] if parents[i] >= 0 else -1 for i in keep])


def _tree_row(session: Session, tokens: list[int], parents: list[int]) -> Row:
    """The verify row of a draft tree: the root (the newest committed token) and the nodes in block order, each
    seeing the committed tokens and its own ancestors."""
    return Row(session.slot, session.kv_length, [session.tokens[-1], *tokens], True, tree_base=session.kv_length,
               visible=tree_visibility(parents))


def _resolve(future: asyncio.Future, result: StepResult) -> None:
    if not future.done():
        future.set_result(result)


def _pass_layers(settings: list[SessionSettings]) -> tuple[int, ...]:
    """The layers one pass asks the engine for, for these feature sessions: () for the last layer alone (the graphed
    pass) unless one wants more; then every layer any of them wants, in order (each list ends with the last layer,
    so their union does)."""
    return tuple(sorted(set().union(*(s.feature_layers for s in settings))))


def _own_columns(
    hidden: torch.Tensor,  # [n, (len(layers) or 1) * hidden_size]: a pass's features of one session's tokens
    layers: tuple[int, ...],  # the pass's layers (_pass_layers; () = the last alone)
    wanted: tuple[int, ...],  # the session's feature_layers (() = the last alone), each one of the pass's
) -> torch.Tensor:
    """The session's own features [n, (len(wanted) or 1) * hidden_size]: its layers' columns side by side."""
    if wanted == layers:
        return hidden
    size = hidden.shape[-1] // len(layers)
    if not wanted:
        return hidden[:, -size:].contiguous()
    index = [layers.index(i) for i in wanted]
    return hidden.unflatten(-1, (len(layers), size))[:, index].flatten(-2)


def _length_groups(lengths: list[int], graphed: tuple[int, int] | None = None) -> list[list[int]]:
    """Indices in ascending order of length, cut into groups whose longest is at most twice their shortest; with
    graphed = (rows, tokens) (LlamaEngine.graphed_prefill), prompts of at most `tokens` also go at most `rows` a
    group, so that their passes replay graphs instead of running eagerly: an eager prefill of a new shape is where
    a verifier's ticks took 117-154 ms at p99 on an H200 (docs/benchmarks.md, thirteenth session)."""
    rows, tokens = graphed or (0, 0)
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        full = groups and lengths[i] <= tokens and len(groups[-1]) >= rows
        if groups and lengths[i] <= 2 * lengths[groups[-1][0]] and not full:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _check_distribution(i: int, token: int, dist: DraftDistribution, vocab_size: int) -> None:
    if len(dist.token_ids) != len(dist.probs):
        raise InvalidInput(f"draft distribution {i}: {len(dist.token_ids)} ids but {len(dist.probs)} probabilities")
    if not dist.token_ids:
        return
    if any(not 0 <= t < vocab_size for t in dist.token_ids):
        raise InvalidInput(f"draft distribution {i} names a token id outside the vocabulary [0, {vocab_size})")
    if any(not math.isfinite(p) or p < 0 for p in dist.probs):
        raise InvalidInput(f"draft distribution {i} has a negative or non-finite probability")
    total = sum(dist.probs)
    if abs(total - 1.0) > _PROB_TOLERANCE:
        raise InvalidInput(f"draft distribution {i} sums to {total:.6f}, not 1")
    if not any(t == token and p > 0 for t, p in zip(dist.token_ids, dist.probs)):
        raise InvalidInput(f"draft token {i} ({token}) has probability 0 under its own declared distribution")


def _fill_draft_probs(dest: torch.Tensor, tokens: list[int], dists: list[DraftDistribution] | None) -> None:
    """dest [n_max, vocab]: the declared sparse distributions, or point masses on the drafted tokens."""
    for i, token in enumerate(tokens):
        dist = dists[i] if dists else None
        if dist is None or not dist.token_ids:
            dest[i, token] = 1.0
        else:
            probs = torch.tensor(dist.probs, dtype=torch.float64)
            dest[i].index_add_(0, torch.tensor(dist.token_ids), probs / probs.sum())
