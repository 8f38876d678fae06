"""The lean model runner: prefill and candidate forwards over a preallocated KV cache.

It runs a Llama-family model (llama, mistral, qwen2, qwen3) with the model's own weights but
its own attention and cache, so that one forward scores many candidates of many rows
(docs/algorithm.md §7):

- `forward_tokens` takes N packed tokens; token i belongs to row r(i) (a cache slot) and is the
  candidate of rank j(i). All candidates of a row sit at the same position id (the row's
  length, docs/algorithm.md §2), and each one's K/V is stored at cache position `length + rank`.
  The mask lets a candidate see the row's prefix and its own position only — the tree mask of
  speculative decoding — so its final hidden state equals a separate forward of prefix + c_j
  (the cache-sharing trap of docs/algorithm.md §3 cannot happen).
- `commit` keeps only each row's chosen candidate: its K/V move from `length + rank` to
  `length` (compaction). Positions past a row's length are scratch and are always masked.
- `logits` runs the LM head only on the hidden states it is given (the chosen ones).

Speed (gpt-fast style): q/k/v and gate/up projections run as one fused matmul each (the fused
tensors are laid out once at load time, weights.py, and shared by every runner of the model);
RMSNorm is `_rms_norm` (HF's own rounding order); RoPE runs once on q and k together from a
precomputed cos/sin table.
On CPU the per-op overhead of ~40 small ops per layer was a large share of a decode step.

Shapes: N packed tokens, R rows, K max tokens per row, S keys, Hq/Hkv heads, g = Hq/Hkv.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mara_serve.engine.errors import UnsupportedModelError
from mara_serve.engine.graphs import PaddedForward, pack_inputs, run_packed
from mara_serve.engine.kv_cache import KVCache, KVPlan, bytes_per_position
from mara_serve.engine.loading import LoadedModel, cpu_has_amx
from mara_serve.engine.native import NativeBuildError, NativeDecoder
from mara_serve.engine.quantization import Int8Weight, int8_linear
from mara_serve.engine.weights import (
    SUPPORTED_MODEL_TYPES,
    LayerWeights,
    can_split_for_cpu,
    head_groups,
    split_for_cpu,
    split_weight,
)

MAX_CANDIDATES = 256  # the largest top_k a MARA step may use (scratch positions per row)
# Decode forwards of up to this many tokens (rows x candidates) run in the native kernel
# (native/), larger ones eagerly: on a 2-core AVX512-BF16 EPYC the native forward is 1.3-5x the
# eager one up to 32 tokens, equal at 64, slower at 128 (bench/RESULTS.md), in float32 and
# bfloat16. On a CPU with AMX, oneDNN's bf16 matmul is nearly flat from 2 to 16 rows
# (bench/RESULTS.md, a 2-core Xeon), so there bf16 forwards of more than a few tokens stay eager.
NATIVE_MAX_TOKENS = 64
NATIVE_MAX_TOKENS_AMX_BF16 = 4

# SDPA kernels the runner uses on a GPU. Not cuDNN's, torch's first choice on Hopper: it builds
# an execution plan on the host for every new shape, and the key length grows every decode
# step, so it re-planned on every call — ~2 ms per layer and call on an H200 (16 ms with a
# candidate mask), 55–70 ms a step whatever the model size (bench/RESULTS.md). Flash and
# memory-efficient attention need no plan (the tree mask goes to the memory-efficient one).
GPU_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x (n, in) @ w.T (+ b) → (n, out): `w` is a dense (out, in) weight or a (groups, in,
    out/groups) view of one (`weights.split_for_cpu`: one batched matmul, groups in parallel),
    or an int8 weight (`--quantization int8`, quantization.py)."""
    if isinstance(w, Int8Weight):
        return int8_linear(x, w.q, w.scales, b)
    if w.dim() == 3:
        xs = x.expand(w.shape[0], *x.shape)
        y = torch.bmm(xs, w) if b is None else torch.baddbmm(b, xs, w)  # (groups, n, out/g)
        return y.transpose(0, 1).reshape(x.shape[0], -1)
    if x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        # One row in bf16 on a CPU: torch's gemv reads the weights at the memory bandwidth,
        # F.linear's one-row oneDNN/AMX matmul at about half of it (SmolLM2's 30 gate/up
        # matrices at one row: 4.1-4.3 ms vs 7.5-7.6, bench/RESULTS.md). At 2+ rows the
        # matmul wins again (two gemvs read the weights twice).
        y = torch.mv(w, x[0]) if b is None else torch.addmv(b, w, x[0])
        return y[None]
    return F.linear(x, w, b)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the Llama-family HF modules compute it: in float32, the result rounded to
    the model dtype, THEN scaled by the weight in that dtype. `F.rms_norm` scales before it
    rounds: in bf16 the runner's hidden states then left the reference's (max |diff| 1.0 on
    SmolLM2's prompt states) and greedy decoding flipped at ties the reference does not have
    ("What is the capital of France?" answered "L'Étoile…" instead of "Paris"); with this
    formula the runner's bf16 prefill states equal HF's bit for bit. The float32 part runs as
    one fused `F.rms_norm` without weight (bit-equal to HF's pow/mean/rsqrt, 17 % faster at a
    500-row prefill); float32 models use it with the weight directly (the same numbers)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], w, eps)
    return w * F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ModelRunner:
    def __init__(
        self,
        lm: LoadedModel,
        max_slots: int,
        split_matmuls: bool = True,
        kv_budget: int | None = None,
        kv_reserved_tokens: int = 0,
        padded_steps: bool = False,
        native_decode: bool = False,
    ):
        """`max_slots` sequences at most; the KV cache is sized once from `kv_budget` bytes
        (None: every slot holds a full-length sequence), `kv_reserved_tokens` positions of it
        left to the prefix cache (kv_cache.KVPlan; `self.kv_plan` says what it fitted).
        `padded_steps`: decode forwards run over padded shape buckets, captured as CUDA graphs
        on a GPU (graphs.py; on a CPU eagerly, for tests). `native_decode`: on a CPU, decode
        forwards of up to `native_max_tokens` tokens and the LM head on as many states run in C
        (native/: one call instead of ~1,300 ops); where it cannot (no compiler, unsupported
        model) the runner stays eager and `native_off_reason` says why."""
        model = lm.model
        cfg = model.config
        if lm.weights is None:
            raise UnsupportedModelError(
                f"model type {cfg.model_type!r} is not supported by the batched engine "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        self.lm = lm
        attn = model.model.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.scale = attn.scaling
        weights = lm.weights  # laid out once at load time, shared by every runner of `lm`
        self.layers = weights.layers
        self.norm_w, self.norm_eps = weights.norm_w, weights.norm_eps
        self.embed = weights.embed
        self.device, self.dtype = lm.device, lm.dtype
        head = weights.lm_head
        self.head_w, self.head_b = weights.head_w, getattr(head, "bias", None)
        self.split_matmuls = (split_matmuls and lm.quantization == "none"
                              and can_split_for_cpu(self.device, self.dtype))  # fmt: skip
        if self.split_matmuls:  # views of the same weights (weights.split_for_cpu)
            threads = torch.get_num_threads()
            self.layers = tuple(split_for_cpu(layer, threads) for layer in self.layers)
            self.head_w, self.head_b = split_weight(
                self.head_w, self.head_b, threads, head_groups(self.head_w.shape[0], threads)
            )
        max_len = lm.max_model_len
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True):
            max_len = min(max_len, window)  # within the window, sliding == full attention
        # Room past the longest sequence for the candidates of a step (rank < MAX_CANDIDATES).
        per_position = bytes_per_position(len(self.layers), self.num_kv_heads, self.head_dim,
                                          self.dtype)  # fmt: skip
        self.kv_plan = KVPlan.fit(kv_budget, per_position, max_len, max_slots, MAX_CANDIDATES,
                                  kv_reserved_tokens * per_position)  # fmt: skip
        self.max_len = self.kv_plan.max_len
        self.cache = KVCache(len(self.layers), self.num_kv_heads, self.head_dim, self.kv_plan,
                             self.dtype, self.device)  # fmt: skip
        # cos/sin for every position from the model's own rotary module (it knows its scaling
        # variant); a step then only indexes the table.
        with torch.inference_mode():
            dummy = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = model.model.rotary_emb(
                dummy, torch.arange(max_len, device=self.device)[None]
            )
        self.cos, self.sin = cos[0], sin[0]  # (max_len, d)
        self.padded = (
            PaddedForward(self.forward_tokens, self.cache, capture=self.device.type == "cuda")
            if padded_steps
            else None
        )
        self.native: NativeDecoder | None = None
        self.native_max_tokens = (
            NATIVE_MAX_TOKENS_AMX_BF16
            if self.dtype == torch.bfloat16 and cpu_has_amx()
            else NATIVE_MAX_TOKENS
        )
        self.native_off_reason: str | None = "off (--no-cpu-native-decode)"
        if native_decode:
            try:
                self.native = NativeDecoder(self)
                self.native_off_reason = None
            except NativeBuildError as e:
                self.native_off_reason = f"the native kernel did not build: {e}"
            except ValueError as e:  # a model it does not support, or weights it cannot read
                self.native_off_reason = str(e)

    def attention_kernels(self) -> AbstractContextManager:
        """The SDPA backends a forward may use (GPU_SDPA_BACKENDS on a GPU)."""
        return sdpa_kernel(GPU_SDPA_BACKENDS) if self.device.type == "cuda" else nullcontext()

    # ---- phases -------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int], start: int = 0) -> torch.Tensor:
        """Run a prompt into `slot`; returns the final hidden state (H,) of its last token.

        With `start` > 0 the slot already holds the K/V of the first `start` tokens (a cached
        prefix, prefix_cache.py) and only the rest is computed; `start` < len(token_ids).
        """
        return self.prefill_batch([(slot, token_ids, start)])[0]

    @torch.inference_mode()
    def prefill_batch(self, items: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """Prefill several prompts in one forward: items are (slot, token_ids, start) as for
        `prefill`. The projections and MLPs run once over all the prompts' tokens packed
        together (on a CPU a forward costs about one pass over the weights whatever its row
        count up to a few hundred rows, so 16 short prompts cost little more than one);
        attention runs per prompt against its own slot. Returns (len(items), H) final hidden
        states of each prompt's last token."""
        spans, positions, tokens = [], [], []  # spans: slot, start, T, rows [a, b) in the pack
        a = 0
        for slot, ids, start in items:
            T = len(ids)
            if not 0 <= start < T:
                raise ValueError(f"prefill start {start} outside [0, {T})")
            spans.append((slot, start, T, a, a + T - start))
            positions.append(torch.arange(start, T, device=self.device))
            tokens += ids[start:]
            a += T - start
        self.cache.check(max(T for _, _, T, _, _ in spans) + 1)
        x = self.embed(torch.tensor(tokens, device=self.device))  # (N, H)
        pos = positions[0] if len(positions) == 1 else torch.cat(positions)
        cos, sin = self.cos[pos, None], self.sin[pos, None]  # (N, 1, d)
        # A prompt with a cached prefix: query i (position start + i) sees keys 0..start + i.
        masks = [
            None if start == 0
            else torch.arange(T, device=self.device)[None, :] <= positions[i][:, None]
            for i, (_, start, T, _, _) in enumerate(spans)
        ]  # fmt: skip
        with self.attention_kernels():
            x = self._prefill_layers(x, cos, sin, spans, masks)
        last = [b - 1 for *_, b in spans]
        return _rms_norm(x[last], self.norm_w, self.norm_eps)

    def _prefill_layers(self, x, cos, sin, spans, masks) -> torch.Tensor:
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)  # (N, H*, d)
            outs = []
            for (slot, start, T, a, b), mask in zip(spans, masks, strict=True):
                k_new, v_new = k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)
                self.cache.keys[li, slot, :, start:T] = k_new
                self.cache.values[li, slot, :, start:T] = v_new
                if start:  # attend over the cached prefix too
                    k_new = self.cache.keys[li, slot, :, :T]
                    v_new = self.cache.values[li, slot, :, :T]
                o = F.scaled_dot_product_attention(
                    q[a:b].transpose(0, 1)[None],
                    k_new[None],
                    v_new[None],
                    attn_mask=mask,
                    is_causal=mask is None,
                    scale=self.scale,
                    enable_gqa=self.groups > 1,
                )  # (1, Hq, T - start, d)
                outs.append(o[0].transpose(0, 1).reshape(b - a, -1))
            x = self._attn_out_and_mlp(layer, x, outs[0] if len(outs) == 1 else torch.cat(outs))
        return x

    @torch.inference_mode()
    def score(self, slots: list[int], lengths: list[int], tokens: list[int], row_of: list[int],
              col_of: list[int], rank_of: list[int]) -> torch.Tensor:  # fmt: skip
        """`forward_tokens` from host lists (the decode step's packing): the step's inputs go
        to the device in one copy and the keys read are known without a device sync; padded
        and captured (`self.padded`) where a bucket fits. Returns (N, H)."""
        kmax = max(col_of) + 1
        num_keys = max(lengths[r] + k for r, k in zip(row_of, rank_of, strict=True)) + 1
        native = self.native is not None and self.padded is None
        if native and len(tokens) <= self.native_max_tokens:
            token_lengths = [lengths[r] for r in row_of]
            stores = [n + k for n, k in zip(token_lengths, rank_of, strict=True)]
            self.cache.check(max(stores) + 1)
            return self.native.decode(tokens, [slots[r] for r in row_of], token_lengths, stores)
        dense = slots == list(range(len(slots)))
        if self.padded is not None:
            shape = self.padded.shape(len(slots), kmax, num_keys, dense)
            if shape is not None:
                return self.padded(slots, lengths, tokens, row_of, col_of, rank_of, shape)
        packed = pack_inputs(lengths, tokens, row_of, col_of, rank_of, None if dense else slots)
        return run_packed(self.forward_tokens, torch.tensor(packed, device=self.device),
                          len(slots), len(tokens), kmax, num_keys, dense)  # fmt: skip

    @torch.inference_mode()
    def forward_tokens(
        self,
        rows: torch.Tensor | int,
        lengths: torch.Tensor,
        token_ids: torch.Tensor,
        row_of: torch.Tensor,
        col_of: torch.Tensor,
        kmax: int,
        rank_of: torch.Tensor | None = None,
        num_keys: int | None = None,
    ) -> torch.Tensor:
        """Score N packed tokens (row-major), each a candidate at its row's next position.

        rows: int R (the dense slots 0..R-1) or a (R,) tensor of slots; lengths (R,) prefix
        lengths; token_ids/row_of/col_of (N,): token, its row, its column in the padded
        (R, kmax) grid; rank_of (N,): its candidate rank (default: col_of), which picks its
        scratch cache position `length + rank`. num_keys: cache positions attention reads (at
        least every store position + 1; None: computed, a device sync). A token stored at or
        past num_keys (graphs.py's padding cells) sees the last of them instead of its own.
        Returns final hidden states (N, H).
        """
        R = rows if isinstance(rows, int) else int(rows.numel())
        slots = torch.arange(R, device=self.device) if isinstance(rows, int) else rows
        N = int(token_ids.numel())
        rank_of = col_of if rank_of is None else rank_of
        store_pos = lengths[row_of] + rank_of  # (N,) where each token's K/V are written
        S = int(store_pos.max()) + 1 if num_keys is None else num_keys  # keys the step reads
        self.cache.check(S)
        cos, sin = self.cos[lengths[row_of]][:, None], self.sin[lengths[row_of]][:, None]
        mask = self._tree_mask(R, kmax, S, lengths, row_of, col_of, store_pos)  # (R,1,gK,S)
        dense = N == R * kmax  # every row has kmax tokens: packed order == padded order
        flat = None if dense else row_of * kmax + col_of
        token_slots = slots[row_of]
        x = self.embed(token_ids)  # (N, H)
        with self.attention_kernels():
            for i, layer in enumerate(self.layers):
                q, k, v = self._qkv(layer, x, cos, sin)
                self.cache.keys[i, token_slots, :, store_pos] = k  # (N, Hkv, d)
                self.cache.values[i, token_slots, :, store_pos] = v
                k_all, v_all = self.cache.prefix(i, rows, S)  # (R, Hkv, S, d)
                o = self._attend(q, k_all, v_all, mask, R, kmax, flat)
                x = self._attn_out_and_mlp(layer, x, o)
        return _rms_norm(x, self.norm_w, self.norm_eps)

    def commit(self, slots: list[int], lengths: list[int], ranks: list[int]) -> None:
        """Keep each row's chosen candidate: its K/V move from length + rank to length."""
        moving = [i for i, r in enumerate(ranks) if r != 0]  # rank 0 already sits at `length`
        if moving:
            where = torch.tensor(
                [(slots[i], lengths[i] + ranks[i], lengths[i]) for i in moving], device=self.device
            )  # (M, 3): slot, from, to — one host→device copy
            self.cache.move_positions(where[:, 0], where[:, 1], where[:, 2])

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (M, H) → float32 logits (M, V): the LM head on the chosen states only."""
        if self.native is not None and hidden.shape[0] <= self.native_max_tokens:
            return self.native.logits(hidden)
        return _linear(hidden, self.head_w, self.head_b).float()

    # ---- pieces -------------------------------------------------------------------------

    def _qkv(self, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        n, Hq, Hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        h = _rms_norm(x, layer.ln1_w, layer.ln1_eps)
        qkv = _linear(h, layer.qkv_w, layer.qkv_b).view(n, Hq + 2 * Hkv, d)
        qk, v = qkv[:, : Hq + Hkv], qkv[:, Hq + Hkv :]
        if layer.q_norm is not None:
            qk = torch.cat((layer.q_norm(qk[:, :Hq]), layer.k_norm(qk[:, Hq:])), dim=1)
        qk = qk * cos + _rotate_half(qk) * sin  # RoPE on q and k in one go
        return qk[:, :Hq], qk[:, Hq:], v

    def _attn_out_and_mlp(self, layer: LayerWeights, x: torch.Tensor, attn: torch.Tensor):
        x = x + _linear(attn, layer.o_w, layer.o_b)
        h = _rms_norm(x, layer.ln2_w, layer.ln2_eps)
        gate, up = _linear(h, layer.gate_up_w, layer.gate_up_b).chunk(2, dim=-1)
        return x + _linear(layer.act(gate) * up, layer.down_w, layer.down_b)

    def _tree_mask(self, R, kmax, S, lengths, row_of, col_of, store_pos) -> torch.Tensor:
        """Additive mask (R, 1, g*kmax, S): grid cell (r, c) sees t < length_r and its own
        store position. Empty grid cells see the prefix only (no NaN rows)."""
        t = torch.arange(S, device=self.device)
        visible = (t[None, None] < lengths[:, None, None]).expand(R, kmax, S).clone()
        own = store_pos.clamp(max=S - 1)  # padding cells store past S (graphs.py)
        visible.index_put_((row_of, col_of, own), torch.ones((), dtype=torch.bool,
                                                             device=self.device))  # fmt: skip
        bias = torch.zeros(R, kmax, S, dtype=self.dtype, device=self.device)
        bias.masked_fill_(~visible, float("-inf"))
        # q rows are laid out (g, kmax) per kv head: repeat the mask over the g query heads.
        return bias[:, None, None].expand(R, 1, self.groups, kmax, S).reshape(R, 1, -1, S)

    def _attend(self, q, k_all, v_all, mask, R: int, kmax: int, flat) -> torch.Tensor:
        """q (N, Hq, d) against each row's keys (R, Hkv, S, d) under `mask`. → (N, Hq*d)."""
        Hkv, g, d = self.num_kv_heads, self.groups, self.head_dim
        if flat is not None:  # scatter the packed tokens into the padded (R, kmax) grid
            q = q.new_zeros(R * kmax, *q.shape[1:]).index_copy_(0, flat, q)
        # q head h uses kv head h // g (transformers' repeat_kv order).
        q = q.view(R, kmax, Hkv, g, d).permute(0, 2, 3, 1, 4).reshape(R, Hkv, g * kmax, d)
        # One fused kernel (flash / memory-efficient SDPA with the tree mask): no score tensor
        # of size S is materialised, and softmax accumulates in float32 on every backend.
        o = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=self.scale)
        o = o.view(R, Hkv, g, kmax, d).permute(0, 3, 1, 2, 4).reshape(R * kmax, Hkv * g * d)
        return o if flat is None else o.index_select(0, flat)
