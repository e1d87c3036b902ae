"""A compact Llama-family engine: ragged batched forward over a slotted, preallocated KV cache.

Used by the verifier (many sessions' blocks in one pass) and the model drafter alike. Each row of a batch is one
session: its KV slot, the position of its first new token (= tokens already in its cache) and its new tokens.
Rows differ in cache length and in number of new tokens; padding is masked out. Rolling a session back is
free: the caller passes a smaller start position next time, and positions past it are overwritten.

Covers the Llama, Mistral, Qwen2 and Qwen3 shapes (q/k/v bias, per-head q/k norms). Weights come from
transformers' own model (which reads safetensors and GGUF), so RoPE variants are taken from its `inv_freq`.
This module does not own sampling, verification or scheduling.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specdec import settings

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModel(ValueError):
    """An architecture outside the Llama family this engine implements; the message names what is supported."""


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int

    @classmethod
    def from_hf_config(cls, cfg) -> "LlamaShape":
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"model type {cfg.model_type!r} is not supported by the engine; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(dtype).bits // 8


@dataclass
class Row:
    """One session's share of a forward pass."""

    slot: int
    start: int  # tokens of this session already in its KV slot; the first new token goes at this position
    tokens: list[int]  # new tokens, at positions start .. start + len(tokens) - 1
    all_logits: bool = False  # logits for every new token (verification) or only the last (prefill, decode)
    # A draft tree instead of a chain: the KV from index tree_base (<= start) on holds tree nodes, which see the
    # cache before tree_base and their own ancestors only. visible[t]: the offsets from tree_base of the keys new
    # token t sees there, its ancestors' and its own (start - tree_base + t); its RoPE position is tree_base +
    # len(visible[t]) - 1 (its depth), while its KV goes to index start + t. None: a chain (each token sees all
    # before it). Rows of one pass may mix chains and trees.
    tree_base: int | None = None
    visible: list[list[int]] | torch.Tensor | None = None  # or as bools [len(tokens), offsets] (tree_visibility)


@dataclass
class _Ahead:
    """Greedy steps queued past a decode_greedy call (its `ahead`), for the next call to take up."""

    rows: list[tuple[int, int, int]]  # (slot, start, token) of each row the next call must ask for
    tokens: torch.Tensor  # [rows, steps] the steps' tokens, on the device
    state: tuple  # (step, buffers, limit) of LlamaEngine._greedy_state, where the steps left them; positions
    # stay below limit (its graph's KV length)


class KVCache:
    """Preallocated KV slots: keys/values [num_slots + 1, kv_heads, max_len, head_dim] per layer (views of
    all_keys/all_values [layers, ...]).

    The extra last slot is scratch: padding tokens of a batch write there, so every pass writes a fixed number of
    entries without a host-side filter (which also makes passes capturable as CUDA graphs).
    """

    def __init__(self, shape: LlamaShape, num_slots: int, max_len: int, device, dtype):
        size = (shape.num_layers, num_slots + 1, shape.num_kv_heads, max_len, shape.head_dim)
        # one tensor each for every layer (a KV move is then one indexed copy, not one per layer); keys[i] and
        # values[i] are layer i's views of them
        self.all_keys = torch.zeros(size, device=device, dtype=dtype)
        self.all_values = torch.zeros(size, device=device, dtype=dtype)
        self.keys = list(self.all_keys.unbind(0))
        self.values = list(self.all_values.unbind(0))
        self.num_slots = num_slots
        self.scratch = num_slots
        self.max_len = max_len
        self._free = list(range(num_slots - 1, -1, -1))
        self.ahead: _Ahead | None = None  # greedy steps queued for a next decode_greedy (any other use drops them)

    def allocate(self) -> int | None:
        self.ahead = None
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        self.ahead = None
        self._free.append(slot)

    def take_ahead(self, rows: list[Row]) -> _Ahead | None:
        """The steps queued ahead for exactly these rows (slots, starts and tokens, in order), or None; either
        way they are dropped from the cache."""
        ahead, self.ahead = self.ahead, None
        if ahead is None or ahead.rows != [(r.slot, r.start, r.tokens[0]) for r in rows]:
            return None
        return ahead

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @torch.inference_mode()
    def move(self, slots: list[int], sources: list[int], targets: list[int]) -> None:
        """Copies the KV at index sources[i] of slot slots[i] to index targets[i], every layer, all entries read
        before any is written: a draft tree's accepted path moved to where its tokens sit as a chain. Two indexed
        copies for the whole cache (per layer, they were 4 kernels a layer: ~0.5 ms of launches a tree round on a
        GPU, estimated)."""
        self.ahead = None
        if not slots:
            return
        slot, source, target = torch.tensor([slots, sources, targets], device=self.keys[0].device)  # one copy
        for both in (self.all_keys, self.all_values):
            both[:, slot, :, target] = both[:, slot, :, source]


class Linear:
    """x @ weight.T + bias, as F.linear computes it. On a CPU the weight is packed once, at load, into oneDNN's
    blocked layout and applied by oneDNN's GEMM: measured on a 2-core AVX2 EPYC (`bench/cpu_linear.py`), the MKL
    GEMM behind F.linear ran the default target's LM head 2x slower than oneDNN for one token and 4x slower for 2-8
    tokens (MKL takes a slow path for more than one row on that CPU), so a verify pass cost 1.9x a decode step.
    Where oneDNN cannot pack (a bf16 weight without AVX-512 or AVX-NE-CONVERT, a build without oneDNN) or
    SPECDEC_CPU_PACKED_WEIGHTS=no, F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.weight, self._packed = weight, _onednn_packed(weight)
        if self._packed is not None:
            self.weight = None  # the packed copy replaces it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _onednn_packed(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if os.environ.get("SPECDEC_CPU_PACKED_WEIGHTS", "yes").strip().lower() in settings.NO:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
    except RuntimeError as err:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw, ..."
        log.debug("F.linear for a %s weight: oneDNN cannot pack it (%s)", weight.dtype, err)
        return None


class _Layer:
    def __init__(self, hf_layer, device, dtype):
        attn, mlp = hf_layer.self_attn, hf_layer.mlp

        def take(module):
            return None if module is None else module.detach().to(device=device, dtype=dtype)

        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        self.qkv = Linear(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).to(device, dtype),
                          torch.cat(biases).to(device, dtype) if biases[0] is not None else None)
        self.o = Linear(take(attn.o_proj.weight))
        self.q_norm = take(attn.q_norm.weight) if hasattr(attn, "q_norm") else None
        self.k_norm = take(attn.k_norm.weight) if hasattr(attn, "k_norm") else None
        self.gate_up = Linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).to(device, dtype))
        self.down = Linear(take(mlp.down_proj.weight))
        self.input_norm = take(hf_layer.input_layernorm.weight)
        self.post_norm = take(hf_layer.post_attention_layernorm.weight)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers does it: normalize in fp32, round to the model's dtype, then scale in that dtype. torch's
    # rms_norm without a weight is exactly that normalization (the same bits on a CPU in fp32, bf16 and fp16;
    # tests/test_engine.py), as one fused kernel on CUDA where the composed form launched seven: 61 norms a pass
    # of the default target, a third of a graphed step's ~1,200 kernels.
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaEngine:
    """The forward pass of a Llama-family model over a KVCache."""

    supports_prefix_cache = True  # its KVCache layout is what specdec.prefix_cache copies blocks from
    supports_trees = True  # Row's tree fields, and KVCache.move for the accepted path

    def __init__(self, hf_model, device="cpu", dtype=torch.float32, cuda_graphs: bool | None = None,
                 compile: bool | None = None):
        """cuda_graphs: replay decode/verify passes as CUDA graphs (default: on when the device is CUDA).
        compile: torch.compile the graphed pass first (fewer, fused kernels; minutes of warm-up on first use;
        default: the SPECDEC_COMPILE environment variable, else off)."""
        self.shape = LlamaShape.from_hf_config(hf_model.config)
        self.device = torch.device(device)
        self.dtype = dtype
        # what ran: forward_flat's "graphed" / "eager" passes, decode_greedy's "greedy_steps", and the CUDA graphs
        # captured on the way ("captures", "capture_s"); the verifier logs them when it stops (on a GPU an eager
        # pass costs several graphed ones: it is launch-bound)
        self.passes: Counter = Counter()
        inner = hf_model.model
        self.embed = inner.embed_tokens.weight.detach().to(self.device, dtype)
        self.lm_head = Linear(hf_model.lm_head.weight.detach().to(self.device, dtype))
        self.final_norm = inner.norm.weight.detach().to(self.device, dtype)
        self.layers = [_Layer(layer, self.device, dtype) for layer in inner.layers]
        rotary = inner.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().to(self.device, torch.float32)  # [head_dim / 2]
        self.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        if compile is None:
            compile = settings.compiling()
        if cuda_graphs if cuda_graphs is not None else self.device.type == "cuda":
            self.enable_cuda_graphs(compile=compile)

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        return KVCache(self.shape, num_slots, max_len, self.device, self.dtype)

    def enable_cuda_graphs(self, max_batch: int = 256, max_width: int = 16, compile: bool = False) -> None:
        """Replays decode/verify passes (up to max_batch rows of up to max_width tokens) and wide passes of a few
        rows (up to _GraphRunner.WIDE_BATCH rows of up to WIDE_WIDTH tokens: draft trees' verify passes, the
        prefills of one or a few prompts) as CUDA graphs, captured lazily per (batch, width, kv length) bucket.
        Larger passes stay eager. With `compile`, what is captured is the torch.compile'd pass (one compilation,
        dynamic in batch, width and kv length)."""
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self._graphs = _GraphRunner(self, max_batch, max_width, compile)

    _graphs = None

    @property
    def graphed_prefill(self) -> tuple[int, int] | None:
        """(rows, tokens): the most prompts, each at most so long, whose prefill replays a CUDA graph (the wide
        passes); None without graphs. More rows in one pass run eagerly."""
        return None if self._graphs is None else (self._graphs.WIDE_BATCH, self._graphs.WIDE_WIDTH)

    @property
    def graph_width(self) -> int:
        """The most tokens a row of a pass of any batch (up to the graphs' max_batch rows) may have and still replay
        a CUDA graph; 0 without graphs. Wider rows replay graphs a few rows a pass (graphed_prefill) or run eagerly."""
        return 0 if self._graphs is None else self._graphs.max_width

    @torch.inference_mode()
    def warm_cuda_graphs(self, cache: KVCache, max_rows: int, widths: Sequence[int] = (), max_kv: int = 512,
                         feature_layers: Sequence[Sequence[int]] = ()) -> int:
        """Captures now, instead of on first use mid-serving, the CUDA graphs of greedy decode steps
        (decode_greedy) and of passes `widths` tokens wide, for every batch bucket up to max_rows rows and every
        KV-length bucket up to max_kv tokens; and for each list in feature_layers (forward_flat's `hidden`: a
        fused drafter's layers), the passes `widths` wide that return those layers' outputs. Returns how many
        graphs it captured (0 without CUDA graphs)."""
        if self._graphs is None:
            return 0
        taps = sorted({self.inner_taps(layers) for layers in feature_layers} - {()})
        return self._graphs.warm(cache, max_rows, widths, max_kv, taps)

    def forward(self, cache: KVCache, rows: list[Row]) -> list[torch.Tensor]:
        """Runs every row in one pass; returns per row logits [n, vocab] (n = len(tokens) or 1), float32."""
        logits, sizes = self.forward_flat(cache, rows)
        return list(logits.split(sizes))

    @torch.inference_mode()
    def forward_flat(self, cache: KVCache, rows: list[Row], hidden: bool | Sequence[int] = False):
        """`forward` without the split: logits [sum of n, vocab] float32, rows one after the other, and each
        row's n. For callers that reduce every row alike (an argmax) in one kernel instead of one per row.
        hidden: also return the last layer's output before the final norm at every new token of every row [sum of
        len(tokens), hidden_size] (engine dtype, rows one after the other, whatever all_logits says): what a
        feature-level drafter (specdec.feature_drafter) reads. A list of layer indices ending with the last
        layer's returns those layers' outputs side by side instead [..., len(hidden) * hidden_size] (with CUDA
        graphs, from graphs captured for that list)."""
        taps = self.inner_taps(hidden)
        cache.ahead = None  # (greedy steps queued ahead read KV this pass may change)
        batch, width = len(rows), max(len(r.tokens) for r in rows)
        kv_len = max(r.start + len(r.tokens) for r in rows)
        picks = [
            (b, t) for b, r in enumerate(rows) for t in (range(len(r.tokens)) if r.all_logits else [len(r.tokens) - 1])
        ]
        pick_b = upload([p[0] for p in picks], self.device)
        pick_t = upload([p[1] for p in picks], self.device)
        span = tree_span(rows)
        graphed = None
        if self._graphs is not None and span <= width and self._graphs.accepts(batch, width):
            graphed = self._graphs.run(cache, rows, kv_len, taps)  # None: this bucket's graph failed its check
        self.passes["graphed" if graphed is not None else "eager"] += 1
        if graphed is not None:
            x, all_logits = graphed
            logits = all_logits[pick_b, pick_t].float()
        else:
            inputs = _pack(rows, batch, width, cache.scratch, max(span, width))
            single = rows[0].slot if batch == 1 else None
            x = self._layers(cache, *(upload(t, self.device) for t in inputs), kv_len, single, taps)
            # Logits only where a caller reads them: the LM head is a large share of a small model's cost.
            logits = self._head(x[pick_b, pick_t, -self.shape.hidden_size :]).float()  # [n_picks, vocab]
        sizes = [len(r.tokens) if r.all_logits else 1 for r in rows]
        if hidden:
            if all(r.all_logits for r in rows):  # (verification) the picks are every token already
                return logits, sizes, x[pick_b, pick_t]
            every = [(b, t) for b, r in enumerate(rows) for t in range(len(r.tokens))]
            every_b = upload([p[0] for p in every], self.device)
            every_t = upload([p[1] for p in every], self.device)
            return logits, sizes, x[every_b, every_t]
        return logits, sizes

    @torch.inference_mode()
    def decode_greedy(self, cache: KVCache, rows: list[Row], steps: int, more=None,
                      ahead: int = 0) -> list[list[int]]:
        """Up to `steps` greedy decode steps for every row at once: each row is one token (a session's last
        committed one, at its start position), and each step's argmax is fed back as the next step's token on
        the device. more(i), when given, is asked before step i > 0 is queued and ends the run early when it says
        no (the scheduler's "other work arrived; time is up"). Returns each row's tokens, as many as steps ran;
        the host reads them once, where a loop of `forward_flat` calls copies inputs in (a pageable
        host-to-device copy waits for the device) and reads the argmax back every step. The caller owns
        stopping at EOS: tokens after it are simply not committed, and the KV they wrote lies past the session's
        length, so the next pass overwrites it. Every position written, start .. start + steps - 1, must lie
        inside the cache.

        ahead: then queue this many more steps right behind them, which the read-back does not wait for: the next
        call for exactly the rows these steps lead to (same slots, start + steps run, the last token) takes them
        up and goes on from where they left the device, on a GPU with nothing read back or copied in between. So
        the device keeps working while the caller hands the tokens on. Any other pass over the cache, a KV move,
        or a slot allocated or released drops them (their KV lies past the committed tokens)."""
        if any(len(r.tokens) != 1 for r in rows) or steps < 1:
            raise ValueError("decode_greedy takes rows of one token each and at least one step")
        graphed = self._graphs is not None and self._graphs.accepts(len(rows), 1)
        with self._graphs._on_device() if graphed else contextlib.nullcontext():
            queued = cache.take_ahead(rows)
            done = 0 if queued is None else queued.tokens.shape[1]
            end = max(r.start for r in rows) + max(steps, done)  # one past the last position these steps reach
            extra = max(0, ahead - max(0, done - steps))  # new steps queued behind them, to have `ahead` waiting
            if end + extra > cache.max_len:
                extra = 0
            if queued is not None and end + extra <= queued.state[2]:
                state, tokens = queued.state, queued.tokens  # go on from the device's own buffers
            elif queued is not None:  # from the host: the queued tokens read back, the inputs packed after them
                after = [Row(r.slot, r.start + done, [t]) for r, t in zip(rows, queued.tokens[:, -1].tolist())]
                state, tokens = self._greedy_state(cache, after, end + extra, graphed), queued.tokens
            else:
                state, tokens = self._greedy_state(cache, rows, end + extra, graphed), None
            step, buffers, _ = state
            if steps > done:
                new = _greedy_steps(step, buffers[0], steps - done, more and (lambda i: more(done + i)))
                self.passes["greedy_steps"] += new.shape[1]
                tokens = new[: len(rows)] if tokens is None else torch.cat((tokens, new[: len(rows)]), 1)
            read = _read_back(tokens[:, :steps])
            tail = tokens[:, steps:]
            if extra:
                tail = torch.cat((tail, _greedy_steps(step, buffers[0], extra)[: len(rows)]), 1)
                self.passes["greedy_steps"] += extra
            result = read()
            if tail.shape[1]:
                cache.ahead = _Ahead([(r.slot, r.start + len(t), t[-1]) for r, t in zip(rows, result)], tail, state)
            return result

    def _greedy_state(self, cache: KVCache, rows: list[Row], end: int, graphed: bool):
        """(step, buffers, limit) for greedy steps of these rows, their inputs packed in: step() runs one decode
        pass over the buffers, advances them in place (_feed_back) and returns the tokens [batch]; positions must
        stay below limit. end: one past the last position the steps will write."""
        if graphed:
            return self._graphs.greedy_state(cache, rows, end)
        inputs = [upload(t, self.device) for t in _pack(rows, len(rows), 1, cache.scratch)]
        single = rows[0].slot if len(rows) == 1 else None
        kv_len = [max(r.start for r in rows) + 1]

        def step():  # the pass forward_flat makes for these rows, at the exact KV length of each step
            kv_len[0] += 1
            return _feed_back(self._head(self._layers(cache, *inputs, kv_len[0] - 1, single)), inputs, cache.scratch)

        return step, inputs, cache.max_len

    def inner_taps(self, hidden: bool | Sequence[int]) -> tuple[int, ...]:
        """The layers before the last whose outputs forward_flat's `hidden` asks for (ValueError for a list that
        does not end with the last layer or names a layer this model lacks)."""
        if isinstance(hidden, bool):
            return ()
        last = self.shape.num_layers - 1
        taps = tuple(int(i) for i in hidden)
        if not taps or taps[-1] != last or any(not 0 <= i < j for i, j in zip(taps, taps[1:])):
            raise ValueError(f"hidden layers {list(taps)} must be layers of this model (0..{last}) in increasing "
                             "order, ending with the last")
        return taps[:-1]

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(_rms_norm(x, self.final_norm, self.shape.rms_norm_eps))

    def _layers(
        self,
        cache: KVCache,
        tokens: torch.Tensor,  # [batch, width] long
        positions: torch.Tensor,  # [batch, width] long: RoPE positions
        write_slots: torch.Tensor,  # [batch * width] long: the slot each token's KV goes to (scratch for padding)
        write_pos: torch.Tensor,  # [batch * width] long: the KV index it goes to
        slots: torch.Tensor,  # [batch] long
        base: torch.Tensor,  # [batch] long: each row sees every key before this index (Row.tree_base, or start)
        visible: torch.Tensor,  # [batch, width, span] bool: and those at base + j where visible[b, t, j]
        kv_len: int,  # keys 0..kv_len-1 are read; the same for all rows (masked per row)
        single_slot: int | None = None,  # batch of one: read its slot as a view instead of a gather
        taps: tuple[int, ...] = (),  # layers whose outputs come before the last's in the result (see _blocks)
    ) -> torch.Tensor:
        """The transformer layers; no host synchronization inside, so the pass can be graph-captured."""
        return self._blocks(cache, self.embed[tokens], positions, write_slots, write_pos, slots, base, visible, kv_len,
                            single_slot, taps)

    def _blocks(self, cache: KVCache, x: torch.Tensor, positions, write_slots, write_pos, slots, base, visible,
                kv_len: int, single_slot: int | None = None, taps: tuple[int, ...] = ()) -> torch.Tensor:
        """The layers over input states x [batch, width, hidden] (token embeddings, or a feature drafter's
        fused inputs); the other arguments as in `_layers`. Returns the last layer's output, before the norm,
        after the outputs of the layers in `taps` when given ([batch, width, (len(taps) + 1) * hidden])."""
        kept = []
        s = self.shape
        batch, width = x.shape[:2]
        # [batch, 1, width, kv_len], as an additive bias (0 or -inf) built once: given as booleans, SDPA converts
        # the mask in every layer (measured on an H200: the graphed step 2.88 -> 2.77 ms; compiled, unchanged)
        mask = torch.zeros((), dtype=x.dtype, device=x.device).masked_fill(
            ~_attention_mask(base, visible, kv_len), float("-inf"))
        freqs = positions[..., None].float() * self.inv_freq  # [batch, width, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(self.dtype)[:, None]  # [batch, 1, width, head_dim]
        sin = (emb.sin() * self.attention_scaling).to(self.dtype)[:, None]

        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm, s.rms_norm_eps)
            qkv = layer.qkv(h)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(batch, width, s.num_heads, s.head_dim)
            k = k.view(batch, width, s.num_kv_heads, s.head_dim)
            v = v.view(batch, width, s.num_kv_heads, s.head_dim)
            if layer.q_norm is not None:
                q = _rms_norm(q, layer.q_norm, s.rms_norm_eps)
                k = _rms_norm(k, layer.k_norm, s.rms_norm_eps)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, heads, width, head_dim]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = cache.keys[i], cache.values[i]
            # [batch * width, kv_heads, head_dim] into (slot, :, position)
            keys[write_slots, :, write_pos] = k.transpose(1, 2).reshape(batch * width, s.num_kv_heads, s.head_dim)
            values[write_slots, :, write_pos] = v.transpose(1, 2).reshape(batch * width, s.num_kv_heads, s.head_dim)
            if single_slot is not None:
                k_all = keys[single_slot : single_slot + 1, :, :kv_len]
                v_all = values[single_slot : single_slot + 1, :, :kv_len]
            else:
                k_all, v_all = keys[slots, :, :kv_len], values[slots, :, :kv_len]
            attn = _attend(q, k_all, v_all, mask)
            x = x + layer.o(attn.transpose(1, 2).reshape(batch, width, q_size))
            h = _rms_norm(x, layer.post_norm, s.rms_norm_eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
            if i in taps:
                kept.append(x)
        return torch.cat((*kept, x), dim=-1) if kept else x


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of q [batch, heads, width, head_dim] over keys/values [batch, kv_heads, kv_len, head_dim] (grouped
    query heads share a kv head), with mask [batch, 1, width, kv_len] added to the scores (0 or -inf).

    One bf16 query a row on a CPU goes as two (the query twice, the first answer kept): torch's CPU
    flash-attention kernel takes a slow path for a single bf16 query, 2-3x a two-query call's time at
    128-2048 keys on a 2-core AVX-512 EPYC (`bench/cpu_attention.py`), so a decode step cost more than a verify
    pass. (Attending in fp32 instead was as fast up to ~512 keys, then slower: fp32 copies of the keys and values
    allocated in every layer.)"""
    if q.shape[2] == 1 and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        twice = F.scaled_dot_product_attention(torch.cat((q, q), dim=2), keys, values,
                                               attn_mask=mask.expand(-1, -1, 2, -1), enable_gqa=True)
        return twice[:, :, :1]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def _attention_mask(base: torch.Tensor, visible: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[batch, 1, width, kv_len] bool: query t of row b sees key k if k < base[b], or k = base[b] + j with
    visible[b, t, j] (see _pack). For a chain that is k <= its position: causal attention."""
    batch, width, span = visible.shape
    offset = torch.arange(kv_len, device=base.device)[None, None, :] - base[:, None, None]  # [batch, 1, kv_len]
    seen = visible.gather(-1, offset.clamp(0, span - 1).expand(batch, width, kv_len))
    return ((offset < 0) | (seen & (offset < span)))[:, None]


def tree_visibility(parents: list[int]) -> torch.Tensor:
    """What a draft tree's verify row sees: [n + 1, n + 1] bool, row i at block offset i (0 = the root, the newest
    committed token; i + 1 = node i, whose parent is parents[i], -1 for the root) seeing itself and its ancestors.
    A few tensor ops per level instead of a Python loop per node (a 4x4 tree 5 deep has 68 nodes)."""
    up = torch.tensor([0, *(p + 1 for p in parents)])  # each row's parent row; the root its own
    rows = torch.arange(len(up))
    seen = torch.zeros(len(up), len(up), dtype=torch.bool)
    current = rows
    while True:
        seen[rows, current] = True
        parent = up[current]
        if torch.equal(parent, current):
            return seen
        current = parent


def upload(data, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host data (a tensor, or a list for torch.tensor) on `device` without waiting for the device. A plain
    `.to(cuda)` of a pageable host tensor makes the host wait for every kernel already queued on the stream (13
    such waits in a batch of drafts at 64 users on an H200, each the longer for sharing the GPU with another
    process: docs/benchmarks.md, tenth session); staged in pinned memory (torch's caching host allocator, which
    keeps the block until its copy is done) the copy is queued like a kernel and the host runs on."""
    tensor = torch.as_tensor(data, dtype=dtype)
    if tensor.device.type != "cpu" or torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def tree_span(rows: list[Row]) -> int:
    """The widest stretch of KV from a row's tree base (or start) to its last new token: the `span` of _pack."""
    return max(r.start - (r.start if r.tree_base is None else r.tree_base) + len(r.tokens) for r in rows)


def _pack(rows: list[Row], batch: int, width: int, scratch: int, span: int | None = None):
    """Host tensors for a pass: tokens and RoPE positions [batch, width], write targets (slot, KV index)
    [batch * width], slots [batch], and what each token sees: every key before base [batch] and those at base + j
    where visible [batch, width, span] says so (span: at least tree_span(rows); default width). Rows past len(rows)
    and tokens past a row's length are padding: they write to the scratch slot, and a padding query sits where its
    row's last token does and sees what it sees, so its softmax stays finite.

    Chains (every row of a plain pass) are built from flat Python lists with a handful of tensor ops, whatever the
    batch: per-row tensor writes took 6.4 ms per tick at 256 rows of 6 tokens (0.54 ms this way), time a GPU step
    would wait on. Tree rows fill their own entries after."""
    span = span or width
    tokens = torch.zeros(batch, width, dtype=torch.long)
    positions = torch.zeros(batch, width, dtype=torch.long)
    write_slots = torch.full((batch, width), scratch, dtype=torch.long)
    write_pos = torch.zeros(batch, width, dtype=torch.long)
    slots = torch.full((batch,), scratch, dtype=torch.long)
    base = torch.zeros(batch, dtype=torch.long)
    offsets = torch.arange(width)[None, :]  # [1, width]
    # a chain's token t sees base + 0..t (padding: as its row's last token); rows past len(rows) see base + 0 only,
    # as a chain of one (a graph is captured on such rows)
    visible = (torch.arange(span)[None, None, :] <= offsets[..., None]).expand(batch, width, span).clone()
    visible[len(rows) :, :, 1:] = False
    n = len(rows)
    if n:
        lengths = torch.tensor([len(r.tokens) for r in rows])  # [n]
        row_slots = torch.tensor([r.slot for r in rows])  # [n]
        tokens[:n] = torch.tensor([r.tokens + [0] * (width - len(r.tokens)) for r in rows])
        starts = torch.tensor([r.start for r in rows])[:, None]  # [n, 1]
        last = torch.minimum(offsets, lengths[:, None] - 1)  # [n, width]
        positions[:n] = starts + last
        write_slots[:n] = torch.where(offsets < lengths[:, None], row_slots[:, None], scratch)
        write_pos[:n] = torch.where(offsets < lengths[:, None], starts + offsets, 0)
        slots[:n] = row_slots
        base[:n] = starts[:, 0]
        visible[:n] = visible[:n].gather(1, last[..., None].expand(n, width, span))
        for b, r in enumerate(rows):
            if r.visible is None:
                continue
            seen = r.visible
            if not isinstance(seen, torch.Tensor):  # offsets lists -> [tokens, offsets] bool
                bits = torch.zeros(len(seen), max(max(v) for v in seen) + 1, dtype=torch.bool)
                for t, offsets_seen in enumerate(seen):
                    bits[t, offsets_seen] = True
                seen = bits
            n_tokens, n_seen = seen.shape
            base[b] = r.tree_base
            visible[b] = False
            visible[b, :n_tokens, :n_seen] = seen
            visible[b, n_tokens:, :n_seen] = seen[-1]
            depth = seen.sum(-1) - 1  # [tokens]: ancestors below the tree base
            positions[b, :n_tokens] = r.tree_base + depth
            positions[b, n_tokens:] = r.tree_base + depth[-1]
    return tokens, positions, write_slots.reshape(-1), write_pos.reshape(-1), slots, base, visible


_LOOKAHEAD = 2  # decode_greedy queues at most this many steps ahead of the device


def _feed_back(logits: torch.Tensor, inputs, scratch: int) -> torch.Tensor:
    """One greedy step's end: each row's argmax of its first token's logits [batch, width, vocab] becomes its next
    token, one position on, in the packed `inputs` of the decode pass, in place (padding stays padding; a compiled
    graph's second token is padding). Returns the tokens [batch]."""
    tokens, positions, write_slots, write_pos, _, base, _ = inputs
    picked = logits[:, 0].argmax(-1)
    tokens[:, 0] = picked
    positions += 1
    base += 1
    write_pos.copy_(torch.where(write_slots == scratch, 0, positions.reshape(-1)))
    return picked


def _greedy_steps(step, tokens: torch.Tensor, steps: int, more=None) -> torch.Tensor:
    """Runs `step()` (one greedy step over packed buffers whose tokens [batch, 1] are `tokens`: a decode pass and
    _feed_back, returning the tokens [batch]) up to `steps` times: tokens [batch, steps run] on their device.
    more(i), when given, is asked before queuing step i > 0 and stops the run when it says no; on CUDA the host
    stays at most _LOOKAHEAD steps ahead of the device (it waits on an event, which drains nothing), so what more()
    sees is at most that many steps old and stopping takes effect within as many steps."""
    out = torch.empty(tokens.shape[0], steps, dtype=torch.long, device=tokens.device)
    done: list = []  # on CUDA: an event after each queued step
    ran = 0
    while ran < steps and (ran == 0 or more is None or more(ran)):
        out[:, ran] = step()
        ran += 1
        if tokens.is_cuda:
            done.append(torch.cuda.Event())
            done[-1].record()
            if len(done) > _LOOKAHEAD:
                done.pop(0).synchronize()
    return out[:, :ran]


def _read_back(tokens: torch.Tensor):
    """A function returning tokens as lists, whose wait covers only the device work queued before this call (on
    CUDA: a copy into pinned memory and an event), so work queued after it keeps the device busy meanwhile."""
    if not tokens.is_cuda:
        return tokens.tolist
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read():
        copied.synchronize()
        return host.tolist()

    return read


TREE_PASS_ROWS = 4  # draft trees per verify pass: CUDA graphs take wide passes of this many rows at most


def capture_graph(step, pool):
    """step() (device work on static buffers) captured as a CUDA graph in memory pool `pool`, after two warm-up runs
    on a side stream: (the graph, step's outputs, which each replay rewrites in place)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up kernels and allocator outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = step()
    return graph, outputs


def _bucket(n: int, floor: int = 1) -> int:
    return max(floor, 1 << (n - 1).bit_length())


class _GraphRunner:
    """CUDA graphs of the decode/verify pass, one per (batch, width, kv length) bucket, captured on first use (and
    per list of inner layers whose outputs a pass also returns: LlamaEngine.forward_flat's `hidden`).

    Each graph owns static input buffers; a replay copies the packed inputs in and returns its logits buffer
    [batch, width, vocab]. Padding rows and tokens write to the cache's scratch slot, so they are harmless.
    """

    def __init__(self, engine: LlamaEngine, max_batch: int, max_width: int, compile: bool = False):
        self.engine = engine
        self.max_batch = max_batch
        self.max_width = max_width
        self.pool = self._new_pool()
        self.graphs: dict[tuple, tuple] = {}
        self.step = self._eager_step
        # Buckets of at least 2 rows and 2 tokens: torch.compile specializes sizes 0 and 1, so this keeps every
        # bucket on the one dynamic compilation (a padded row or token costs next to nothing here).
        self.floor = 2 if compile else 1
        self.feed_back = _feed_back
        if compile:
            from torch import _dynamo

            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
            # SPECDEC_COMPILE_MODE: torch.compile's mode, e.g. max-autotune-no-cudagraphs (slower to warm up;
            # the calibration's fastest minimal step used max-autotune); unset = the default mode
            mode = os.environ.get("SPECDEC_COMPILE_MODE") or None
            self.step = torch.compile(self._eager_step, dynamic=True, mode=mode)
            self.feed_back = torch.compile(_feed_back, dynamic=True)  # its five small updates as one kernel

    def _eager_step(self, cache: KVCache, tokens, positions, write_slots, write_pos, slots, base, visible,
                    length: int, taps: tuple[int, ...] = ()):
        x = self.engine._layers(cache, tokens, positions, write_slots, write_pos, slots, base, visible, length,
                                taps=taps)
        return x, self.engine._head(x[..., -self.engine.shape.hidden_size :])

    # Wide passes: draft trees' verify passes, and prefills of a few prompts (eager, a prefill costs about an eager
    # step: launch-bound on a GPU). A graph's logits are [batch, width, vocab].
    WIDE_BATCH, WIDE_WIDTH = TREE_PASS_ROWS, 128

    def accepts(self, batch: int, width: int) -> bool:
        if width <= self.max_width:
            return batch <= self.max_batch
        return width <= self.WIDE_WIDTH and batch <= self.WIDE_BATCH

    def run(self, cache: KVCache, rows: list[Row], kv_len: int, taps: tuple[int, ...] = ()) -> torch.Tensor:
        width = _bucket(max(len(r.tokens) for r in rows), self.floor)
        # Capture and replay on the engine's own device: the current device of this thread may be another GPU
        # (a drafter and a verifier in one process), and a graph captured on the wrong device is empty.
        with self._on_device():
            entry = self._loaded(cache, rows, width, kv_len, taps)
            if entry is None:
                return None
            graph, _, outputs = entry
            graph.replay()
            return outputs

    def greedy_state(self, cache: KVCache, rows: list[Row], end: int):
        """LlamaEngine.decode_greedy's steps on one graph (the caller is on the engine's device) that holds the
        pass and its _feed_back, so a replay is a whole greedy step: the rows' inputs copied into its buffers once,
        then each step one replay, queued without reading anything back, so the device runs the steps back to back
        while the host queues the next. Returns (step, buffers, the graph's KV length)."""
        length = self._length(cache, end)
        graph, buffers, outputs = self._loaded(cache, rows, self.floor, end, greedy=True)

        def step():
            graph.replay()
            return outputs[-1]

        return step, buffers, length

    def _loaded(self, cache: KVCache, rows: list[Row], width: int, kv_len: int, taps: tuple[int, ...] = (),
                greedy: bool = False):
        """The (graph, input buffers, outputs) of these rows' bucket, captured on first use, with the rows' packed
        inputs copied into its buffers. greedy: the graph of a greedy step (see greedy_state) instead of a pass."""
        batch = _bucket(len(rows), self.floor)
        entry = self._graph(cache, batch, width, self._length(cache, kv_len), taps, greedy)
        if entry is None:
            return None
        for buffer, value in zip(entry[1], _pack(rows, batch, width, cache.scratch)):
            buffer.copy_(value, non_blocking=True)
        return entry

    def _graph(self, cache: KVCache, batch: int, width: int, length: int, taps: tuple[int, ...], greedy: bool):
        """The bucket's (graph, input buffers, outputs), captured on first use; None if its graph failed the
        capture check (run such passes eagerly)."""
        key = self._key(cache, batch, width, length, taps, greedy)
        if key not in self.graphs:
            began = time.perf_counter()
            self.graphs[key] = self._capture(cache, batch, width, length, taps, greedy)
            self.engine.passes["captures"] += 1
            self.engine.passes["capture_s"] += time.perf_counter() - began
        return self.graphs[key]

    def warm(self, cache: KVCache, max_rows: int, widths: Sequence[int], max_kv: int,
             taps: Sequence[tuple[int, ...]] = ()) -> int:
        """LlamaEngine.warm_cuda_graphs (taps: inner_taps of each feature-layer list)."""
        before = len(self.graphs)
        batches = sorted({_bucket(n, self.floor) for n in range(1, min(max_rows, self.max_batch) + 1)})
        lengths = {self._length(cache, max_kv)}  # and every smaller bucket
        while min(lengths) > self._length(cache, 1):
            lengths.add(self._length(cache, min(lengths) // 2))
        passes = sorted({_bucket(w, self.floor) for w in widths if self.accepts(1, w)})
        # (width, taps, greedy): the greedy step, then the passes, plain and with each list's hidden states
        kinds = [(self.floor, (), True), *((w, t, False) for t in [(), *taps] for w in passes)]
        todo = [(batch, width, length, tapped, greedy) for length in sorted(lengths) for batch in batches
                for width, tapped, greedy in kinds
                if (greedy or self.accepts(batch, width))  # wide passes (prefills): a few rows only
                and self._key(cache, batch, width, length, tapped, greedy) not in self.graphs]
        began = told = time.perf_counter()
        with self._on_device():
            for done, bucket in enumerate(todo, 1):
                self._graph(cache, *bucket)
                if time.perf_counter() - told >= self.PROGRESS_EVERY_S and done < len(todo):
                    told = time.perf_counter()  # a long warm-up (a compiled pass: ~13 s a graph on an H200) says so
                    log.info("captured %d of %d CUDA graphs (%.0f s)", done, len(todo), told - began)
        return len(self.graphs) - before

    PROGRESS_EVERY_S = 30.0

    @staticmethod
    def _key(cache: KVCache, batch: int, width: int, length: int, taps: tuple[int, ...], greedy: bool) -> tuple:
        """A bucket's entry in self.graphs."""
        return id(cache), batch, width, length, taps, greedy

    @staticmethod
    def _length(cache: KVCache, kv_len: int) -> int:
        return min(_bucket(kv_len, floor=128), cache.max_len)

    # The CUDA specifics, one method each (tests stand them in on a CPU to run this class's own logic there).
    def _new_pool(self):
        return torch.cuda.graph_pool_handle()

    def _on_device(self):
        return torch.cuda.device(self.engine.device)

    def _record(self, step):
        return capture_graph(step, self.pool)

    def _capture(self, cache: KVCache, batch: int, width: int, length: int, taps: tuple[int, ...],
                 greedy: bool = False):
        engine = self.engine
        dev = engine.device
        buffers = [t.to(dev) for t in _pack([], batch, width, cache.scratch)]

        def step():
            outputs = self.step(cache, *buffers, length, taps)
            return (*outputs, self.feed_back(outputs[1], buffers, cache.scratch)) if greedy else outputs

        graph, outputs = self._record(step)
        logits = outputs[1]
        # A replay must reproduce the eager pass on the same inputs; a graph that does not (say, captured empty)
        # would return stale logits silently, so refuse it loudly instead. Both runs start from fresh padding, every
        # token of it token 0 at position 0, so the writes they all make to the scratch slot's first entry agree:
        # a greedy step's warm-ups leave an argmax in each row's first token, and where its second token is padding
        # too (a compiled graph's) the two raced for that entry, which the attention then reads (H200, fifteenth
        # session: logits 1.6-43 apart, the compiled verifier refused to start).
        fresh = [t.to(dev) for t in _pack([], batch, width, cache.scratch)]

        def reset():
            for buffer, value in zip(buffers, fresh):
                buffer.copy_(value)

        reset()
        graph.replay()
        reset()
        # (Against the same function run outside the graph: a compiled pass fuses, so it rounds differently from
        # the eager one, and both verify and decode use the one pass, so the output stays the engine's own.)
        replayed, eager = logits.float(), step()[1].float()
        if not torch.allclose(replayed, eager, rtol=1e-2, atol=1e-2):
            apart = (replayed - eager).abs().max().item()
            if width > self.max_width:  # a wide bucket: run those passes eagerly (same logits, slower)
                log.warning("CUDA graph for %d rows of %d tokens does not match the eager pass (logits up to %.3g "
                            "apart); running such wide passes (draft trees' verifies, prefills) eagerly", batch, width,
                            apart)
                return None
            raise RuntimeError(f"CUDA graph for batch {batch}, width {width}, kv length {length} does not match "
                               f"the eager pass (logits up to {apart:.3g} apart); run with cuda_graphs=False and "
                               "report this")
        return graph, buffers, outputs
