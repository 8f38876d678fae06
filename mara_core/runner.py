"""The lean model runner: prefill and candidate forwards over a preallocated KV cache.

It runs the layers of a Llama-family model (llama, mistral, qwen2, qwen3) from the model's own
modules, but owns the attention and the cache so that one forward can score many candidates per
row (DESIGN.md, "The decode step"):

- `forward_tokens` takes a packed list of N tokens, each belonging to a row (a cache slot) at
  that row's next position. Every token attends to its row's prefix and to itself only — the
  tree mask of speculative decoding, built without materialising the mask: the prefix scores
  and the self score are computed separately and share one softmax. So the final hidden state
  of candidate j equals a separate forward of prefix + c_j (MARA_SPEC.md §2, cache-sharing trap).
- Nothing is written to the cache during the forward; the per-layer K/V of every token go to a
  scratch buffer, and `commit` copies only each row's chosen token into the cache (compaction).
- `logits` runs the LM head only on the hidden states it is given (the chosen ones).

Shapes: N packed tokens, R rows, Kmax max tokens of a row, Hq/Hkv heads, g = Hq/Hkv, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mara_core.errors import UnsupportedModelError
from mara_core.kv_cache import KVCache
from mara_core.loading import LoadedModel

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ModelRunner:
    def __init__(self, lm: LoadedModel, max_slots: int):
        model = lm.model
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model type {cfg.model_type!r} is not supported by the batched engine "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        self.lm = lm
        self.model = model
        self.layers = list(model.model.layers)
        self.norm = model.model.norm
        self.embed = model.model.embed_tokens
        self.lm_head = model.get_output_embeddings()
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.scale = attn.scaling
        self.has_qk_norm = hasattr(attn, "q_norm")
        self.device, self.dtype = lm.device, lm.dtype
        max_len = lm.max_model_len
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True):
            max_len = min(max_len, window)  # within the window, sliding == full attention
        self.max_len = max_len
        self.cache = KVCache(len(self.layers), max_slots, self.num_kv_heads, self.head_dim,
                             max_len, self.dtype, self.device)  # fmt: skip
        # cos/sin for every position, computed once by the model's own rotary module (which
        # knows its scaling variant); a step then only indexes the table.
        with torch.inference_mode():
            dummy = torch.zeros(1, dtype=self.dtype, device=self.device)
            pos = torch.arange(max_len, device=self.device)[None]
            cos, sin = model.model.rotary_emb(dummy, pos)
        self.cos, self.sin = cos[0], sin[0]  # (max_len, d)

    # ---- phases -------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int]) -> torch.Tensor:
        """Run a prompt into `slot`; returns the final hidden state (H,) of its last token."""
        T = len(token_ids)
        self.cache.ensure_capacity(T + 1)
        ids = torch.tensor(token_ids, device=self.device)
        x = self.embed(ids)  # (T, H)
        cos, sin = self.cos[:T, None], self.sin[:T, None]  # (T, 1, d)
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(layer.self_attn, h, cos, sin)  # (T, H*, d)
            q, k, v = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
            self.cache.write_prefix(i, slot, k[0], v[0])
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.groups > 1
            )  # (1, Hq, T, d)
            x = x + layer.self_attn.o_proj(o[0].transpose(0, 1).reshape(T, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x[-1])

    @torch.inference_mode()
    def forward_tokens(
        self,
        rows: torch.Tensor | int,
        lengths: torch.Tensor,
        token_ids: torch.Tensor,
        row_of: torch.Tensor,
        col_of: torch.Tensor,
        kmax: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score N packed tokens, each at its row's next position, attending prefix + itself.

        rows: int R (dense slots 0..R-1) or a (R,) tensor of slots; lengths (R,) prefix lengths;
        token_ids/row_of/col_of (N,) packed row-major. Returns final hidden states (N, H) and
        the scratch K/V (L, N, Hkv, d) for `commit`.
        """
        R = rows if isinstance(rows, int) else int(rows.numel())
        N = int(token_ids.numel())
        T = int(lengths.max())
        self.cache.ensure_capacity(T + 1)
        positions = lengths[row_of]  # (N,)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (N, 1, d)
        # Additive mask over the padded prefix: position t is visible to row r iff t < length.
        prefix_bias = torch.zeros(R, 1, 1, T, dtype=self.dtype, device=self.device)
        prefix_bias.masked_fill_(
            torch.arange(T, device=self.device)[None, None, None] >= lengths[:, None, None, None],
            float("-inf"),
        )
        dense = N == R * kmax  # every row has kmax tokens: the packed order is the padded order
        flat_index = None if dense else row_of * kmax + col_of
        L = len(self.layers)
        scratch_k = torch.empty(L, N, self.num_kv_heads, self.head_dim, dtype=self.dtype,
                                device=self.device)  # fmt: skip
        scratch_v = torch.empty_like(scratch_k)
        x = self.embed(token_ids)  # (N, H)
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(layer.self_attn, h, cos, sin)
            scratch_k[i], scratch_v[i] = k, v
            k_pre, v_pre = self.cache.prefix(i, rows, T)
            o = self._attend(q, k, v, k_pre, v_pre, prefix_bias, R, kmax, flat_index)
            x = x + layer.self_attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x), scratch_k, scratch_v

    def commit(
        self,
        slots: torch.Tensor,
        positions: torch.Tensor,
        scratch_k: torch.Tensor,
        scratch_v: torch.Tensor,
        token_index: torch.Tensor,
    ) -> None:
        """Keep only the chosen tokens' K/V: token_index[m] → slot slots[m] at positions[m]."""
        self.cache.commit(slots, positions, scratch_k[:, token_index], scratch_v[:, token_index])

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (M, H) → float32 logits (M, V): the LM head on the chosen states only."""
        return self.lm_head(hidden).float()

    # ---- pieces -------------------------------------------------------------------------

    def _qkv(self, attn, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        n = h.shape[0]
        q = attn.q_proj(h).view(n, self.num_heads, self.head_dim)
        k = attn.k_proj(h).view(n, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(h).view(n, self.num_kv_heads, self.head_dim)
        if self.has_qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _attend(self, q, k, v, k_pre, v_pre, prefix_bias, R: int, kmax: int, flat_index):
        """Tree attention: token j of row r sees row r's prefix and itself. Returns (N, Hq*d)."""
        Hkv, g, d = self.num_kv_heads, self.groups, self.head_dim
        if flat_index is not None:  # scatter the packed tokens into the padded (R, Kmax) grid
            q = q.new_zeros(R * kmax, *q.shape[1:]).index_copy_(0, flat_index, q)
            k = k.new_zeros(R * kmax, *k.shape[1:]).index_copy_(0, flat_index, k)
            v = v.new_zeros(R * kmax, *v.shape[1:]).index_copy_(0, flat_index, v)
        # q head h uses kv head h // g (transformers' repeat_kv order).
        qg = q.view(R, kmax, Hkv, g, d).permute(0, 2, 3, 1, 4)  # (R, Hkv, g, Kmax, d)
        kg = k.view(R, kmax, Hkv, d).transpose(1, 2)  # (R, Hkv, Kmax, d)
        vg = v.view(R, kmax, Hkv, d).transpose(1, 2)
        q2 = qg.reshape(R, Hkv, g * kmax, d)
        s_pre = torch.matmul(q2, k_pre.transpose(-1, -2)) * self.scale + prefix_bias
        s_self = (qg * kg[:, :, None]).sum(-1).reshape(R, Hkv, g * kmax, 1) * self.scale
        # softmax in float32 (a no-op on CPU; keeps bf16/fp16 GPU runs close to the reference)
        p = torch.softmax(torch.cat((s_pre, s_self), dim=-1).float(), dim=-1).to(q.dtype)
        T = k_pre.shape[2]
        o = torch.matmul(p[..., :T], v_pre)  # (R, Hkv, gK, d)
        o = o.view(R, Hkv, g, kmax, d) + p[..., T:].view(R, Hkv, g, kmax, 1) * vg[:, :, None]
        o = o.permute(0, 3, 1, 2, 4).reshape(R * kmax, Hkv * g * d)  # (R*Kmax, Hq*d)
        return o if flat_index is None else o.index_select(0, flat_index)
