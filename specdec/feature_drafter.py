"""Feature-level drafters (EAGLE style): a Llama layer (or a few) that reads the target's own last hidden states.

A token-level drafter sees only tokens, so it must redo what the target already computed. A feature drafter is
handed the target's last-layer output f_p at every committed position p (before the final norm: what the LM head
reads, after the norm) and learns to predict the next one. Its row for token x_{p+1} takes
z = fc([rms(embed(x_{p+1})), rms(f_p)]) through its decoder layer(s) (one by default) to h_{p+1} ~ f_{p+1}
(rms: scaled to unit root mean square, so the token's embedding is not drowned by the few huge dimensions of a
Llama's last hidden state); the target's final norm and LM head (rows of the reduced draft vocabulary) turn h into
a distribution for x_{p+2}. Drafting further feeds h back in place of the feature the target has not computed yet.
Rows sit at KV index and RoPE position p (one less than the token's), so index 0 holds x_1's row: a slot never
reads a position its session did not write.

A fused drafter (EAGLE-3) reads several target layers' outputs instead of the last one's alone (`taps`, e.g. a low,
a middle and the last layer): each scaled to unit RMS, side by side, through a learned matrix `fuse` into one
state, which takes f_p's place above; it still predicts the last layer's next state, which drafting feeds back.

Training (`specdec train-drafter --layers feature` or `fused`) runs `FeatureDrafterModel.unrolled`: pass 1 reads
the target's features, pass d > 1 reads pass d - 1's predictions, each with the attention pattern that drafting step d sees
(the keys of true-feature rows before it and its own earlier predicted rows), so the drafter learns from its own
inputs as drafting produces them ("training-time test", as in HASS and EAGLE-3).

The artifact is a drafter artifact (specdec.drafter_model) with `kind: "feature"`: the layer, the norm and `fc`
(and `fuse`, with the tapped layers as `taps` in its config); the embeddings and LM head are the target's, checked
by hash. `FeatureRunner` runs one on the engine's layer code
with a KV slot per session. Verification stays lossless whatever the features: the drafter only proposes.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specdec import drafter_model
from specdec.engine import Linear, LlamaEngine, Row, _bucket, _pack, capture_graph, tree_span, upload
from specdec.sampling import draft_picks, draw_without_replacement

log = logging.getLogger(__name__)

KIND = "feature"
_FC_KEYS = ("fc.weight", "fc.bias")


class FeatureDrafterModel(nn.Module):
    """The trainable drafter: `fc` and a LlamaForCausalLM of `num_layers` layers (`lm`) holding the target's frozen
    embeddings and (reduced) LM head; `lm`'s final norm starts as the target's."""

    def __init__(self, llama_config: dict, embed: torch.Tensor, lm_head: torch.Tensor, draft_vocab: list[int] | None,
                 num_layers: int = 1, taps: list[int] | None = None):
        super().__init__()
        self.lm = drafter_model.build_drafter(
            {**llama_config, "num_hidden_layers": num_layers}, embed, lm_head, draft_vocab
        )
        hidden = self.lm.config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.draft_vocab = self.lm.draft_vocab
        # the target layers whose outputs the drafter reads, in order, the last layer's last (None: that one only);
        # several are fused into one state of the hidden size (EAGLE-3), started as the last layer's alone
        self.taps = list(taps) if taps else None
        self.fuse = None
        if self.taps and len(self.taps) > 1:
            self.fuse = nn.Linear(len(self.taps) * hidden, hidden, bias=False)
            with torch.no_grad():
                self.fuse.weight.zero_()
                self.fuse.weight[:, -hidden:] = torch.eye(hidden)

    @property
    def feature_width(self) -> int:
        """Width of the target's features this drafter reads: the hidden size times the layers tapped."""
        return self.lm.config.hidden_size * (len(self.taps) if self.taps else 1)

    def fused(self, features: torch.Tensor) -> torch.Tensor:
        """The target's features [..., feature_width] -> the drafter's input state [..., hidden]: itself for one
        layer; for several, each layer's state scaled to unit RMS, then `fuse`."""
        if self.fuse is None:
            return features
        return fuse_layers(features, self.fuse, self.fuse.weight.dtype, self.lm.config.hidden_size)

    @property
    def config(self):
        return self.lm.config

    def init_from_target(self, target) -> None:
        """Layers from the target's last layers, norm from its final norm, fc passing the feature through: the
        starting point predicts with the target's own top layers instead of noise."""
        mine = self.lm.model.layers
        for layer, theirs in zip(mine, target.model.layers[-len(mine):]):
            layer.load_state_dict({k: v.float() for k, v in theirs.state_dict().items()})
        self.lm.model.norm.load_state_dict({k: v.float() for k, v in target.model.norm.state_dict().items()})
        hidden = self.fc.in_features // 2
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[:, hidden:] = torch.eye(hidden)
            self.fc.weight[:, :hidden] = torch.eye(hidden)
            self.fc.bias.zero_()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Predicted features [..., hidden] -> draft logits [..., draft vocab]."""
        return self.lm.lm_head(self.lm.model.norm(h))

    def unrolled(self, ids: torch.Tensor, features: torch.Tensor, passes: int) -> list[torch.Tensor]:
        """Training forward over whole sequences. ids [batch, T], features [batch, T, hidden] (the target's, before
        its final norm). Row j (0 <= j < T - 1) is token ids[:, j + 1] at position j. Returns one tensor
        [batch, T - 1, hidden] per pass: pass d's row j predicts features[:, j + 1] as drafting step d + 1 would,
        meaningful for j >= d."""
        layers, cfg = self.lm.model.layers, self.lm.config
        batch, rows = ids.shape[0], ids.shape[1] - 1
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        embedded = unit_rms(self.lm.model.embed_tokens(ids[:, 1:]))
        positions = torch.arange(rows, device=ids.device)
        cos, sin = self.lm.model.rotary_emb(embedded, positions[None].expand(batch, -1))
        cos, sin = cos[:, None], sin[:, None]  # [batch, 1, rows, head_dim]

        def rope(t):
            half = t.shape[-1] // 2
            return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin

        keys, values, outs = [[] for _ in layers], [[] for _ in layers], []  # per layer, one entry per pass
        features = self.fused(features)
        inputs = features[:, :-1]
        for d in range(passes):
            z = self.fc(torch.cat((embedded, unit_rms(inputs).to(embedded.dtype)), dim=-1))
            mask = _unrolled_mask(rows, d, ids.device)
            for layer, layer_keys, layer_values in zip(layers, keys, values):
                attn = layer.self_attn
                h = layer.input_layernorm(z)
                q = attn.q_proj(h).view(batch, rows, heads, head_dim).transpose(1, 2)
                k = attn.k_proj(h).view(batch, rows, kv_heads, head_dim).transpose(1, 2)
                v = attn.v_proj(h).view(batch, rows, kv_heads, head_dim).transpose(1, 2)
                layer_keys.append(rope(k))
                layer_values.append(v)
                a = F.scaled_dot_product_attention(
                    rope(q), torch.cat(layer_keys, 2), torch.cat(layer_values, 2), attn_mask=mask, enable_gqa=True
                )
                z = z + attn.o_proj(a.transpose(1, 2).reshape(batch, rows, heads * head_dim))
                z = z + layer.mlp(layer.post_attention_layernorm(z))
            outs.append(z)
            # the next pass's row j reads this pass's prediction of row j's feature, made by row j - 1
            inputs = torch.cat((features[:, :1], z[:, :-1]), dim=1)
        return outs

    def own_state(self) -> dict[str, torch.Tensor]:
        """What the artifact stores: the layer, the norm (under the LlamaForCausalLM's names) and fc."""
        state = {k: v for k, v in self.lm.state_dict().items() if k.startswith("model.layers.") or k == "model.norm.weight"}
        state.update({f"fc.{k}": v for k, v in self.fc.state_dict().items()})
        if self.fuse is not None:
            state["fuse.weight"] = self.fuse.weight
        return state


def unit_rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x scaled to unit root mean square over its last dimension (no weight), computed in float32 (torch's fused
    RMSNorm: one kernel on CUDA, the same bits as the composed form; see engine._rms_norm)."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def fuse_layers(features: torch.Tensor, fuse, dtype: torch.dtype, hidden: int) -> torch.Tensor:
    """Several layers' states side by side [..., n * hidden] -> one state [..., hidden]: each scaled to unit RMS
    (a low layer's scale is not the last one's), then the learned `fuse` projection (n * hidden -> hidden, its
    weights in dtype: an nn.Linear, or the runner's engine Linear)."""
    parts = unit_rms(features.unflatten(-1, (-1, hidden)))
    return fuse(parts.flatten(-2).to(dtype))


def _unrolled_mask(rows: int, d: int, device) -> torch.Tensor:
    """[rows, (d + 1) * rows] bool: the keys drafting step d + 1 sees from row j. Pass 0's keys up to j - d (rows
    computed from the target's features), and pass e's key at row j - d + e (its own earlier predictions)."""
    j = torch.arange(rows, device=device)[:, None]
    c = torch.arange(rows, device=device)[None, :]
    blocks = [c <= j - d] + [c == j - d + e for e in range(1, d + 1)]
    return torch.cat(blocks, dim=1)


def is_feature_drafter(artifact_dir) -> bool:
    return drafter_model.is_drafter_artifact(artifact_dir) and drafter_model.read_config(artifact_dir).get("kind") == KIND


def load_feature_drafter(artifact_dir, target_spec: str) -> FeatureDrafterModel:
    """The artifact's drafter with `target_spec`'s embeddings and LM head; DrafterMismatch for another target."""
    config, embed, lm_head, own = drafter_model.checked_artifact(artifact_dir, target_spec)
    model = FeatureDrafterModel(config["llama"], embed, lm_head, config["draft_vocab"],
                                num_layers=config["llama"].get("num_hidden_layers", 1), taps=config.get("taps"))
    fc = {k.removeprefix("fc."): own.pop(k).float() for k in _FC_KEYS}
    model.fc.load_state_dict(fc)
    if model.fuse is not None:
        model.fuse.weight.data.copy_(own.pop("fuse.weight").float())
    drafter_model.load_own_weights(model.lm, own, artifact_dir)
    return model.eval()


@dataclass
class DraftTree:
    """A draft tree after a session's newest committed token (its root): node i is tokens[i] (a target id), the
    child of node parents[i] (-1: the root), listed level by level, so parents come first."""

    tokens: list[int]
    parents: list[int]
    # per node, the distribution it was drawn from (target ids, float32 probabilities); ([], []) = a point mass
    distributions: list[tuple[list[int], list[float]]]


def _children(logits: torch.Tensor, branch: int, temps: torch.Tensor, top_n: int, uniforms: torch.Tensor | None):
    """The `branch` children of each expanded node, on the device. logits [n, count, draft vocab]; temps [n] (0 =
    greedy); uniforms [n, count * branch] for sampled rows (None when no row samples). Returns the children's
    draft-vocabulary indices [n, count, branch], their log draft probabilities (-inf for a sampled child with no
    mass left) and, when some row samples, the declared distributions: (draft-vocabulary ids [n, count, top_n],
    probabilities [n, count, branch, top_n]), all zero on greedy rows (point masses)."""
    n, count, _ = logits.shape
    greedy = logits.log_softmax(-1).topk(branch, dim=-1)
    if uniforms is None:
        return greedy.indices, greedy.values.double(), None
    sampled = (temps > 0)[:, None, None]
    tempered = (logits.double() / torch.where(temps > 0, temps, 1.0)[:, None, None]).topk(
        min(top_n, logits.shape[-1]), dim=-1)
    probs = tempered.values.softmax(-1)  # [n, count, top_n]
    picks, declared = draw_without_replacement(probs.flatten(0, 1), uniforms.reshape(n * count, branch))
    picks, declared = picks.view(n, count, branch), declared.view(n, count, branch, -1)
    mass = declared.gather(-1, picks[..., None])[..., 0]
    logq = probs.gather(-1, picks).log().masked_fill(mass <= 0, -math.inf)
    ids = torch.where(sampled, tempered.indices.gather(-1, picks), greedy.indices)
    logq = torch.where(sampled, logq, greedy.values.double())
    return ids, logq, (tempered.indices, torch.where(sampled[..., None], declared, 0.0))


class FeatureRunner:
    """Runs a FeatureDrafterModel over a slotted KV cache: one ragged pass per drafting step for many sessions.

    On CUDA, steps of up to 64 rows of up to 16 tokens (seeing up to 64 tree nodes back) replay CUDA graphs
    captured per (rows, width, span, KV length) bucket, as the engine's own passes do: one eager layer is ~20 small
    kernels, and launching them costs more than running them (measured on an H200: 2.27 ms per eager drafting step,
    4x a graphed two-layer drafter)."""

    MAX_GRAPH_BATCH, MAX_GRAPH_WIDTH = 64, 16
    MAX_GRAPH_SPAN = 64  # a draft tree's level pass sees nodes written by earlier passes: up to this many back
    # New sessions' prompts (rows wider than MAX_GRAPH_WIDTH): passes of up to PROMPT_GRAPH_ROWS of them, up to
    # MAX_PROMPT_WIDTH tokens, replay graphs 32, 64 or 128 wide too (`warm_graphs` captures them), as the verifier's
    # prefills do; longer prompts run eagerly
    PROMPT_GRAPH_ROWS, MAX_PROMPT_WIDTH = 4, 128

    def __init__(self, model: FeatureDrafterModel, device, dtype, num_slots: int, max_len: int,
                 cuda_graphs: bool | None = None):
        self.engine = LlamaEngine(model.lm, device, dtype, cuda_graphs=False)
        self.fc = Linear(model.fc.weight.detach().to(self.engine.device, dtype),
                         model.fc.bias.detach().to(self.engine.device, dtype))
        self._vocab_index = None if model.draft_vocab is None else model.draft_vocab.to(self.engine.device)
        self.cache = self.engine.new_cache(num_slots, max_len)
        self.hidden_size = model.config.hidden_size
        self.draft_vocab_size = model.lm.get_output_embeddings().weight.shape[0]  # the draft logits' width
        self.feature_width = model.feature_width
        self._fuse = None if model.fuse is None else Linear(model.fuse.weight.detach().to(self.engine.device, dtype))
        if cuda_graphs is None:
            cuda_graphs = self.engine.device.type == "cuda"
        self._graphs: dict[tuple[int, int, int, int], tuple] | None = {} if cuda_graphs else None
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self._loop_inputs: dict[int, tuple] = {}  # rows -> _capture_loop's buffers
        self._prompt_graphs = True  # False once a prompt pass's graph failed its check: prompts then run eagerly

    def _pass(self, tokens, positions, write_slots, write_pos, slots, base, visible, feats, kv_len: int,
              head: bool = True):
        """Device work only (capturable): predicted features [batch, width, hidden] and their logits (None without
        the head: a caller that wants only some tokens' logits takes `_head` of those)."""
        engine = self.engine
        x = self.fc(torch.cat((unit_rms(engine.embed[tokens]), unit_rms(feats)), dim=-1))
        h = engine._blocks(self.cache, x, positions, write_slots, write_pos, slots, base, visible, kv_len)
        return h, engine._head(h) if head else None

    def _inputs(self, rows: list[Row], features: list[torch.Tensor], batch: int, width: int,
                span: int | None = None) -> list[torch.Tensor]:
        dev = self.engine.device
        packed = [upload(t, dev) for t in _pack(rows, batch, width, self.cache.scratch, span)]
        return [*packed, self._feature_inputs(features, batch, width)]

    def _feature_inputs(self, features: list[torch.Tensor], batch: int, width: int) -> torch.Tensor:
        """[batch, width, hidden] on the device: row b's input states (_input_state of features[b]) in its first
        features[b].shape[0] places, zeros after. Rows alike (the same device and width: the target's, on the host,
        or the drafter's own predictions) go over in one copy and one fusing pass, whatever their number: one copy
        and one fuse per row made a 64-session batch of drafts launch ~500 small kernels and wait on 64 copies
        (docs/benchmarks.md, tenth session)."""
        dev, dtype = self.engine.device, self.engine.dtype
        feats = torch.zeros(batch * width, self.hidden_size, device=dev, dtype=dtype)
        alike: dict[tuple, list[int]] = {}
        for b, f in enumerate(features):
            if f.shape[0]:
                alike.setdefault((f.device, f.shape[-1]), []).append(b)
        for members in alike.values():
            lengths = torch.tensor([features[b].shape[0] for b in members])
            starts = torch.tensor(members) * width
            # row b's j-th state goes to flat place b * width + j
            firsts = torch.cumsum(lengths, 0) - lengths  # where each row's states start in `flat`
            index = torch.repeat_interleave(starts - firsts, lengths) + torch.arange(int(lengths.sum()))
            flat = torch.cat([features[b] for b in members])
            states = self._input_state(upload(flat, dev).to(dtype))
            feats.index_copy_(0, upload(index, dev), states)
        return feats.view(batch, width, self.hidden_size)

    def _input_state(self, f: torch.Tensor) -> torch.Tensor:
        """Features [n, feature_width] from the target (fused when the drafter taps several layers), or [n, hidden]
        predicted by the drafter (as they are)."""
        if self._fuse is None or f.shape[-1] == self.hidden_size:
            return f
        return fuse_layers(f, self._fuse, self.engine.dtype, self.hidden_size)

    @torch.inference_mode()
    def step(self, rows: list[Row], features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """rows[b].tokens at KV positions rows[b].start.., each with the feature in features[b] [n_b, hidden] (any
        device; [n_b, feature_width] for the target's own when the drafter taps several layers). Returns, for each
        row's last token, draft logits [batch, draft vocab] float32 and the predicted feature [batch, hidden]: the
        input feature of the token drafted after it.

        Rows longer than MAX_GRAPH_WIDTH (a new session's prompt) run in passes of their own: padded to their
        width, the whole batch's pass would be that wide, eager on a GPU and mostly padding (at 64 users on an
        H200, a batch holding a new session took ~90 ms against ~8 ms: docs/benchmarks.md, eleventh session). With
        CUDA graphs, those within MAX_PROMPT_WIDTH go PROMPT_GRAPH_ROWS at a time, shortest first, and replay the
        prompt graphs (batches of eager prompt passes took 75-90 ms at p90 on an H200 against 6-10 ms for the same
        batch once warm: docs/benchmarks.md, thirteenth session); longer ones share one eager pass."""
        dev = self.engine.device
        batch = len(rows)
        wide = [b for b, r in enumerate(rows) if len(r.tokens) > self.MAX_GRAPH_WIDTH]
        groups = [wide]
        if wide and self._graphs is not None and self._prompt_graphs:
            fits = sorted((b for b in wide if len(rows[b].tokens) <= self.MAX_PROMPT_WIDTH),
                          key=lambda b: len(rows[b].tokens))
            longer = [b for b in wide if len(rows[b].tokens) > self.MAX_PROMPT_WIDTH]  # eager: one pass for them all
            groups = [fits[i : i + self.PROMPT_GRAPH_ROWS] for i in range(0, len(fits), self.PROMPT_GRAPH_ROWS)]
            groups += [longer] if longer else []
        if wide and (len(groups) > 1 or len(wide) < batch):
            narrow = [b for b, r in enumerate(rows) if len(r.tokens) <= self.MAX_GRAPH_WIDTH]
            parts = [(group, self.step([rows[b] for b in group], [features[b] for b in group]))
                     for group in ([narrow] if narrow else []) + groups]
            logits = torch.empty(batch, parts[0][1][0].shape[-1], device=dev, dtype=parts[0][1][0].dtype)
            h = torch.empty(batch, parts[0][1][1].shape[-1], device=dev, dtype=parts[0][1][1].dtype)
            for group, (group_logits, group_h) in parts:
                index = upload(group, dev)
                logits[index], h[index] = group_logits, group_h
            return logits, h
        h, logits = self._run(rows, features, head=False)
        b = torch.arange(batch, device=dev)
        t = upload([len(r.tokens) - 1 for r in rows], dev)
        last = h[b, t]
        # an eager pass (a wide prompt row) leaves out the head: its logits for one token a row, not for all of them
        # (a 150-token prompt's head was ~80% of a new session's first draft on a CPU: bench/drafter_batch.py)
        return (self.engine._head(last) if logits is None else logits[b, t]).float(), last

    @torch.inference_mode()
    def warm_graphs(self, max_rows: int, widths=(1, 2, 4, 8), max_kv: int = 512, steps=(2, 3, 4, 5),
                    prompt_widths=(32, 64, 128)) -> int:
        """Captures now, instead of mid-serving, the CUDA graphs of chain passes `widths` tokens wide and of greedy
        drafting loops of `steps` picks (`_draft_graphed`) for every batch bucket up to max_rows and every
        KV-length bucket up to max_kv: what a draft asks for while its sessions' contexts stay within max_kv (a
        capture mid-serving holds the whole batch of drafts: ~50-100 ms each); and the prompt passes
        (`prompt_widths` wide, up to PROMPT_GRAPH_ROWS rows, KV buckets as wide or wider). Returns how many it
        captured (0 without CUDA graphs)."""
        if self._graphs is None:
            return 0
        top = _bucket(min(max_rows, self.MAX_GRAPH_BATCH))
        batches = [1 << i for i in range(top.bit_length())]
        lengths = sorted({min(128 << i, self.cache.max_len) for i in range(max(max_kv // 128, 1).bit_length())})
        captured = 0
        prompts = [(batch, width, length) for batch, width, length in itertools.product(batches, prompt_widths, lengths)
                   if batch <= self.PROMPT_GRAPH_ROWS and width <= min(length, self.MAX_PROMPT_WIDTH)]
        for batch, width, length in [*itertools.product(batches, widths, lengths), *prompts]:
            key = (batch, _bucket(width), _bucket(width), length)
            if key in self._graphs or (width > self.MAX_GRAPH_WIDTH and not self._prompt_graphs):
                continue
            with torch.cuda.device(self.engine.device):
                entry = self._capture(*key)
            if entry is None and width > self.MAX_GRAPH_WIDTH:  # as _forward does: prompts eager, the rest graphed
                self._prompt_graphs = False
                continue
            if entry is None:  # failed its check: eager from now on, as _forward does
                self._graphs = None
                return captured
            self._graphs[key] = entry
            captured += 1
        for batch, count, length in itertools.product(batches, steps, lengths):
            key = ("greedy", batch, count, length)
            if key not in self._graphs:
                with torch.cuda.device(self.engine.device):
                    self._graphs[key] = self._capture_loop(*key[1:])
                captured += self._graphs[key] is not None
        return captured

    @torch.inference_mode()
    def draft_tree(self, rows: list[Row], features: list[torch.Tensor], depth: int, branch: int, beam: int,
                   temperatures: list[float] | None = None, generators: list | None = None,
                   top_n: int = 64) -> list[DraftTree]:
        """A draft tree after each row (rows and features as for `step`), `depth` levels deep: the root (the row's
        last token) gets `branch` children; at each next level the `beam` nodes of the level with the highest
        draft probability of their path get `branch` children each (so the tree has branch + (depth - 1) * beam
        * branch nodes at most). One pass per level for all rows: the nodes to expand are written to the KV after
        the row's tokens, each seeing the committed tokens and its own ancestors (engine.Row's tree fields), fed
        its parent's predicted feature as a chain feeds them. Nothing of the tree stays valid in the slot: the next
        draft overwrites it. Every level runs on the device (choices, inputs and visibility as tensors, like
        `draft`'s chain); the host reads the tree once at the end.

        Greedy rows (temperatures None or 0) take each node's `branch` most likely tokens and declare point
        masses; sampled rows draw them without replacement from the node's tempered top_n distribution
        (specdec.sampling.draw_without_replacement, with uniforms from generators[b], so a seeded session drafts
        the same again) and declare, for each, the distribution it was drawn from: what verify_tree needs to stay
        lossless. Siblings are never pruned by what was drawn (a child with no mass left is dropped with its
        subtree, which only shortens the draws); which nodes are expanded may depend on anything."""
        dev, vocab = self.engine.device, self._vocab_index
        n = len(rows)
        temps = upload(temperatures or [0.0] * n, dev, torch.float64)
        logits, h = self.step(rows, features)
        logits, h = logits[:, None], h[:, None]  # [n, 1, ...]: the roots
        expanded = [1]  # nodes expanded at each level (the root first): fixed by branch and beam alone
        for _ in range(depth - 1):
            expanded.append(min(beam, expanded[-1] * branch))
        uniforms = None
        if any(t > 0 for t in temperatures or ()):  # each sampled session's draws for the tree, its own generator
            draws = branch * sum(expanded)
            uniforms = torch.stack([torch.rand(draws, generator=generators[b] if generators else None,
                                               dtype=torch.float64) for b in range(n)])
            uniforms = upload(uniforms, dev)
        ends = [r.start + len(r.tokens) for r in rows]
        bases, base_max = upload(ends, dev), max(ends)
        slots = upload([r.slot for r in rows], dev)
        span = max(1, sum(expanded[1:]))  # tree nodes written to the KV, all levels
        parent_index = torch.full((n, 1), -1, device=dev)  # the expanded nodes' indices in the tree (root: -1)
        parent_score = torch.zeros(n, 1, dtype=torch.float64, device=dev)
        parent_seen = torch.zeros(n, 1, span, dtype=torch.bool, device=dev)  # tree offsets each of them sees
        levels = []  # per level: (tokens, parents, scores, declared probabilities or None)
        total = written = drawn = 0
        for level, count in enumerate(expanded):
            picks, logq, declared = _children(logits[:n, :count], branch, temps, top_n,
                                              None if uniforms is None else uniforms[:, drawn : drawn + count * branch])
            drawn += count * branch
            scores = parent_score[:, :, None] + logq  # [n, count, branch]: log draft probability of the path
            parents = parent_index[:, :, None].expand(n, count, branch)
            levels.append((picks.flatten(1), parents.flatten(1), scores.flatten(1), declared))
            if level == depth - 1:
                break
            # the next level's expanded nodes: the likeliest `width` of this one, kept in block order
            width = expanded[level + 1]
            chosen = scores.flatten(1).topk(width, dim=-1).indices.sort(-1).values  # [n, width]
            parent_row = chosen // branch  # the expanded node each chosen one is a child of
            tokens = picks.flatten(1).gather(-1, chosen)
            seen = parent_seen.gather(1, parent_row[..., None].expand(n, width, span)).clone()
            own = torch.arange(width, device=dev)  # (made on the device: a host tensor's copy would wait for it)
            seen[:, own, written + own] = True  # and itself
            feats = h[:n].gather(1, parent_row[..., None].expand(n, width, h.shape[-1]))
            inputs = self._tree_inputs(tokens if vocab is None else vocab[tokens], bases, slots, level, written, seen,
                                       feats)
            h, logits = self._forward(inputs, n, width, base_max + written + width, written + width)
            logits = logits.float()
            parent_index = total + chosen
            parent_score = scores.flatten(1).gather(-1, chosen)
            parent_seen = seen
            total += count * branch
            written += width
        return self._trees(levels, vocab, (temps > 0).tolist())

    def _tree_inputs(self, tokens, bases, slots, level: int, written: int, seen, feats):
        """Padded inputs (as `_inputs` makes them) of a tree level's pass from device tensors: per row, `width`
        nodes at depth level + 1 (RoPE position base + level), written at KV offsets written.. from the base, each
        seeing the committed tokens and the tree offsets `seen` [n, width, span] marks."""
        scratch = self.cache.scratch
        n, width = tokens.shape
        offsets = torch.arange(width, device=tokens.device)

        def make(batch: int, padded_width: int, padded_span: int) -> list[torch.Tensor]:
            pad_rows, pad_tokens = batch - n, padded_width - width
            row_slots = F.pad(slots, (0, pad_rows), value=scratch)
            row_bases = F.pad(bases, (0, pad_rows))
            real = (torch.arange(batch, device=tokens.device) < n)[:, None] & (
                torch.arange(padded_width, device=tokens.device) < width)[None]
            write_slots = torch.where(real, row_slots[:, None], scratch)
            write_pos = torch.where(real, row_bases[:, None] + written + F.pad(offsets, (0, pad_tokens)), 0)
            visible = torch.zeros(batch, padded_width, padded_span, dtype=torch.bool, device=tokens.device)
            visible[:n, :width, : seen.shape[-1]] = seen[..., :padded_span]
            visible[:n, width:] = visible[:n, width - 1 : width]  # padding tokens as the row's last
            visible[n:, :, 0] = True  # padding rows: a chain of one
            positions = (row_bases + level)[:, None].expand(batch, padded_width)
            padded_feats = F.pad(feats.to(self.engine.dtype), (0, 0, 0, pad_tokens, 0, pad_rows))
            return [F.pad(tokens, (0, pad_tokens, 0, pad_rows)), positions.contiguous(), write_slots.reshape(-1),
                    write_pos.reshape(-1), row_slots, row_bases, visible, padded_feats]

        return make

    def _trees(self, levels, vocab, sampled: list[bool]) -> list[DraftTree]:
        """The host's copy of drafted trees: per row, its nodes level by level (target ids) with their declared
        distributions (sampled rows), each child of a node with no mass left (score -inf) dropped with its
        subtree."""
        tokens = torch.cat([t for t, _, _, _ in levels], dim=1)
        tokens = (tokens if vocab is None else vocab[tokens]).tolist()
        parents = torch.cat([p for _, p, _, _ in levels], dim=1).tolist()
        finite = torch.cat([torch.isfinite(s) for _, _, s, _ in levels], dim=1).tolist()
        if any(sampled):  # (ids [n, count, top_n], probs [n, count, branch, top_n]) per level
            ids = torch.cat([i.repeat_interleave(p.shape[2], dim=1) for _, _, _, (i, p) in levels], dim=1)
            ids = (ids if vocab is None else vocab[ids]).tolist()
            probs = torch.cat([p.flatten(1, 2) for _, _, _, (_, p) in levels], dim=1).float().tolist()
        out = []
        for b in range(len(tokens)):
            tree, renumbered = DraftTree([], [], []), {-1: -1}
            for i, (token, parent) in enumerate(zip(tokens[b], parents[b])):
                if not finite[b][i] or parent not in renumbered:
                    continue
                renumbered[i] = len(tree.tokens)
                tree.tokens.append(token)
                tree.parents.append(renumbered[parent])
                tree.distributions.append((ids[b][i], probs[b][i]) if sampled[b] else ([], []))
            out.append(tree)
        return out

    def _run(self, rows: list[Row], features: list[torch.Tensor], head: bool = True):
        """One pass: predicted features [batch', width', hidden] and draft logits [batch', width', draft vocab] of
        every token of every row (padded to a bucket where a CUDA graph ran it); logits None where the pass ran
        eagerly and head is False."""
        batch, width = len(rows), max(len(r.tokens) for r in rows)
        kv_len = max(r.start + len(r.tokens) for r in rows)
        return self._forward(lambda b, w, s: self._inputs(rows, features, b, w, s), batch, width, kv_len,
                             tree_span(rows), head)

    def draft_greedy(self, rows: list[Row], features: list[torch.Tensor], steps: int) -> list[list[int]]:
        """`draft` for greedy rows: the tokens only."""
        return self.draft(rows, features, steps)[0]

    @torch.inference_mode()
    def draft(self, rows: list[Row], features: list[torch.Tensor], steps: int, temperatures: list[float] | None = None,
              uniforms: torch.Tensor | None = None, top_n: int = 64, forced: list[list[int]] | None = None):
        """`steps` draft tokens (target ids) after each row, all on the device: `step` over the rows, then one-token
        passes, each fed the previous pass's pick and predicted feature without a trip to the host; one copy at
        the end instead of one sync per step. The same drafts as calling `step` and picking one step at a time
        (tested).

        forced: per row, tokens (target ids) to feed before drafting, the row's context the target has not made
        features for yet (a proactive draft's guessed block): each is fed instead of that pass's pick, and the
        row's drafts start after them. Every row then runs max(len(forced[b])) + steps passes.

        temperatures: per row, 0 = greedy (the argmax); None = every row greedy. Sampled rows draw from their top
        `top_n` tokens with uniforms [rows, passes] in [0, 1) (the caller's, so a seeded session drafts the same
        again; specdec.sampling.draft_picks; row b's draws from column len(forced[b]) on). Returns (tokens
        [rows][steps], distributions): distributions is None when every row is greedy, else per row and step the
        declared (target ids, float32 probabilities), ([], []) on greedy rows (a point mass)."""
        dev = self.engine.device
        batch = len(rows)
        lead = max((len(f) for f in forced), default=0) if forced else 0
        sampled = temperatures is not None and any(t > 0 for t in temperatures)
        if sampled:
            temps = upload(temperatures, dev, torch.float64)
            uniforms = upload(uniforms, dev, torch.float64)
        if lead:  # [rows, lead] target ids and [rows] counts
            fed_first = upload([f + [0] * (lead - len(f)) for f in forced], dev)
            n_forced = upload([len(f) for f in forced], dev)
        logits, h = self.step(rows, features)
        first = [r.start + len(r.tokens) for r in rows]  # the position of each row's first fed token
        slots = upload([r.slot for r in rows], dev)
        positions = upload(first, dev)
        if not sampled and not lead and steps > 1:
            tokens = self._draft_graphed(logits, h, positions, slots, steps, max(first) + steps - 1)
            if tokens is not None:
                return tokens, None
        vocab = self._vocab_index
        picks, top_ids, top_probs = [], [], []  # per pass: draft-vocabulary indices [rows] (and [rows, top_n])
        fed = None  # the target ids the last pass's picks (or forced tokens) feed to the next [rows]
        for i in range(lead + steps):
            if i:
                inputs = self._device_inputs(fed, positions + i - 1, slots, h)
                out_h, out_logits = self._forward(inputs, batch, 1, max(first) + i)
                h, logits = out_h[:batch, 0], out_logits[:batch, 0]
            if sampled:
                pick, ids, probs = draft_picks(logits, temps, uniforms[:, i], top_n)
                top_ids.append(ids)
                top_probs.append(probs)
            else:
                pick = logits.argmax(-1)
            picks.append(pick)
            fed = pick if vocab is None else vocab[pick]
            if i < lead:
                fed = torch.where(i < n_forced, fed_first[:, i], fed)
        drafted = torch.stack(picks, dim=1)  # [rows, lead + steps]
        own = None
        if lead:  # row b's drafts: passes len(forced[b]) .. len(forced[b]) + steps - 1
            own = n_forced[:, None] + torch.arange(steps, device=dev)  # [rows, steps]
            drafted = drafted.gather(1, own)
        tokens = (drafted if vocab is None else vocab[drafted]).tolist()
        if not sampled:
            return tokens, None
        ids = torch.stack(top_ids, dim=1)  # [rows, lead + steps, top_n]
        probs = torch.stack(top_probs, dim=1)
        if own is not None:
            ids = ids.gather(1, own[..., None].expand(-1, -1, ids.shape[-1]))
            probs = probs.gather(1, own[..., None].expand(-1, -1, probs.shape[-1]))
        ids = (ids if vocab is None else vocab[ids]).tolist()
        probs = probs.tolist()
        return tokens, [[(ids[b][i], probs[b][i]) if temperatures[b] > 0 else ([], []) for i in range(steps)]
                        for b in range(batch)]

    def _device_inputs(self, tokens, positions, slots, feats):
        """Padded inputs, as `_inputs` makes them, for one token per row from device tensors (no host values):
        rows past len(tokens) are padding, writing to the scratch slot."""
        scratch, n = self.cache.scratch, tokens.shape[0]

        def make(batch: int, width: int, span: int) -> list[torch.Tensor]:
            pad = batch - n
            padded_slots = F.pad(slots, (0, pad), value=scratch)
            padded_positions = F.pad(positions, (0, pad))
            write_pos = torch.where(padded_slots == scratch, 0, padded_positions)
            padded_feats = F.pad(feats.to(self.engine.dtype), (0, 0, 0, pad))[:, None]
            visible = torch.zeros(batch, 1, span, dtype=torch.bool, device=tokens.device)
            visible[..., 0] = True  # a chain of one token: all before it, and itself
            return [F.pad(tokens, (0, pad))[:, None], padded_positions[:, None], padded_slots, write_pos,
                    padded_slots, padded_positions, visible, padded_feats]

        return make

    def _forward(self, inputs, batch: int, width: int, kv_len: int, span: int = 1, head: bool = True):
        """(h, logits) [batch', width', ...] of a pass whose padded inputs inputs(batch', width', span') makes (span:
        engine.tree_span of its rows): a CUDA graph replay of the (batch, width, span, kv length) bucket where there
        is one, else the eager pass (its logits None unless head)."""
        span = max(span, width)
        prompt = width > self.MAX_GRAPH_WIDTH  # new sessions' prompts: chains, so their span is their width
        if (self._graphs is None or (prompt and not self._prompt_graphs)
                or batch > (self.PROMPT_GRAPH_ROWS if prompt else self.MAX_GRAPH_BATCH)
                or width > self.MAX_PROMPT_WIDTH or span > (self.MAX_PROMPT_WIDTH if prompt else self.MAX_GRAPH_SPAN)):
            return self._pass(*inputs(batch, width, span), kv_len, head=head)
        key = (_bucket(batch), _bucket(width), _bucket(span), min(_bucket(kv_len, floor=128), self.cache.max_len))
        with torch.cuda.device(self.engine.device):
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(*key)
            if entry is None and prompt:  # a prompt pass's graph failed its check: prompts eager from now on
                self._prompt_graphs = False
                return self._pass(*inputs(batch, width, span), kv_len, head=head)
            if entry is None:  # this runner's graphs failed their check: eager from now on
                self._graphs = None
                return self._pass(*inputs(batch, width, span), kv_len, head=head)
            self._graphs[key] = entry
            graph, buffers, outputs = entry
            for buffer, value in zip(buffers, inputs(*key[:3])):
                buffer.copy_(value, non_blocking=True)
            graph.replay()
            return outputs

    def _capture(self, batch: int, width: int, span: int, length: int):
        buffers = self._inputs([], [], batch, width, span)
        recorded = self._record(
            lambda: self._pass(*buffers, length),
            lambda replayed, eager: torch.allclose(replayed[1].float(), eager[1].float(), rtol=1e-2, atol=1e-2),
            f"the pass of {batch} rows x {width} tokens (drafting eagerly from now on: slower, same drafts)")
        return None if recorded is None else (recorded[0], buffers, recorded[1])

    def _record(self, fn, matches, what: str):
        """fn's device work (on static buffers) as a CUDA graph, replayed once: (graph, its outputs); None, logged,
        where the capture fails or matches(replayed outputs, fn's outputs run eagerly on the same inputs) is false."""
        try:
            graph, outputs = capture_graph(fn, self._pool)
            graph.replay()
            if matches(outputs, fn()):
                return graph, outputs
        except RuntimeError:
            log.exception("feature drafter: capturing the CUDA graph of %s failed", what)
            return None
        log.warning("feature drafter: the CUDA graph of %s does not match its eager run", what)
        return None

    def _draft_graphed(self, logits, h, positions, slots, steps: int, kv_len: int) -> list[list[int]] | None:
        """`draft`'s greedy chain after its first pass (logits [n, draft vocab], h [n, hidden] of each row's last
        token; positions and slots [n] on the device) as one CUDA graph replay: steps picks, steps - 1 passes and
        their inputs, one launch instead of ~25 a pass (a batch of drafts was ~150 launches and ~8 ms of host at
        64 users on an H200: docs/benchmarks.md, eleventh session). Target ids [n][steps], or None where no graph
        serves (no CUDA graphs, too many rows, a graph that failed its check): the caller drafts pass by pass."""
        n = logits.shape[0]
        if self._graphs is None or n > self.MAX_GRAPH_BATCH:
            return None
        key = ("greedy", _bucket(n), steps, min(_bucket(kv_len, floor=128), self.cache.max_len))
        with torch.cuda.device(self.engine.device):
            if key not in self._graphs:
                self._graphs[key] = self._capture_loop(*key[1:])
            entry = self._graphs[key]
            if entry is None:
                return None
            graph, (b_logits, b_h, b_positions, b_slots), (drafted,) = entry
            b_logits[:n].copy_(logits)
            b_h[:n].copy_(h)
            b_positions[:n].copy_(positions)
            b_slots[:n].copy_(slots)
            b_slots[n:].fill_(self.cache.scratch)  # padding rows write to the scratch slot
            graph.replay()
            return drafted[:n].tolist()

    def _capture_loop(self, batch: int, steps: int, length: int):
        """The graph of `_draft_graphed`'s bucket: (graph, its input buffers, its outputs); None if its replay does
        not draft what the eager loop does (that bucket then drafts pass by pass, with the passes' own graphs). The
        input buffers are shared by the buckets of one batch size (replays run one at a time on one stream)."""
        buffers = self._loop_inputs.get(batch)
        if buffers is None:
            dev, dtype = self.engine.device, self.engine.dtype
            buffers = self._loop_inputs[batch] = (
                torch.zeros(batch, self.draft_vocab_size, device=dev),
                torch.zeros(batch, self.hidden_size, device=dev, dtype=dtype),
                torch.zeros(batch, dtype=torch.long, device=dev),
                torch.full((batch,), self.cache.scratch, dtype=torch.long, device=dev))
        recorded = self._record(lambda: self._greedy_loop(buffers, steps, length),
                                lambda replayed, eager: torch.equal(replayed[0], eager[0]),
                                f"{steps} greedy picks for {batch} rows (drafting those pass by pass)")
        return None if recorded is None else (recorded[0], buffers, recorded[1])

    def _greedy_loop(self, buffers, steps: int, length: int) -> tuple[torch.Tensor]:
        """Device work only (capturable): `draft`'s greedy loop from the first pass's outputs, every row padded
        alike (padding rows write to the scratch slot). Returns (target ids [rows, steps],)."""
        logits, h, positions, slots = buffers
        vocab = self._vocab_index
        picks = []
        for i in range(steps):
            if i:
                inputs = self._device_inputs(fed, positions + i - 1, slots, h)(len(fed), 1, 1)
                out_h, out_logits = self._pass(*inputs, length)
                h, logits = out_h[:, 0], out_logits[:, 0]
            pick = logits.argmax(-1)
            picks.append(pick)
            fed = pick if vocab is None else vocab[pick]
        drafted = torch.stack(picks, dim=1)
        return (drafted if vocab is None else vocab[drafted],)
