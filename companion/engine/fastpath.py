"""A lean decode path for plain Llama models, sharing the Hugging Face model's weights.

Why hand-written: at batch 1 on a CPU, HF's forward spends about a third of each
step outside matrix products (per-call overhead of 7 linears per layer, a KV cache
that grows by concatenation, mask building). This path does the same arithmetic
with fewer, larger calls: q/k/v fused into one linear, gate/up into one, and a
preallocated KV cache written in place. That is what lifts bf16 decoding past 2x
HF ``generate`` in fp32 (see docs/serving.md).

Invariants
- The fused weights are the storage: after :func:`fuse_weights`, each HF
  ``q_proj/k_proj/v_proj/gate_proj/up_proj`` weight is a *view* into the fused
  tensor, so anything that writes the HF parameters in place (``apply_delta``)
  updates the fast path too, and the HF forward keeps working unchanged.
- Numerics follow HF's Llama: RMSNorm in fp32, rotary tables in fp32 cast to the
  model dtype, SDPA attention with scale head_dim^-0.5. Logits match HF's forward
  within float tolerance (tested).
- Only models for which :func:`supported` is true use it (default rotary, no
  biases, SiLU); others are served by the HF forward.
- Multi-row products run in fp32 ("wide" steps). This CPU has no bf16 matrix units
  (no avx512_bf16 / AMX): a bf16 GEMM costs about one GEMV per row, so with 13-16 rows
  it is 3-5x slower than fp32, while a single-row bf16 GEMV wins by halving the bytes
  read (measured: docs/serving.md). A bf16 model therefore keeps an fp32 copy of its
  weights (:attr:`FastLlama.wide_params`, HF names -> fp32 tensors, +4 bytes/param):
  prompt prefills and batched steps use it, single-token decode steps use bf16. Anything
  that writes the bf16 weights must write these too (``LocalEngine.apply_delta`` does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def supported(model) -> bool:
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    return (
        cfg.model_type == "llama"
        and rope.get("rope_type", "default") == "default"
        and not getattr(cfg, "attention_bias", False)
        and not getattr(cfg, "mlp_bias", False)
        and getattr(cfg, "hidden_act", "silu") == "silu"
    )


def _fuse(parts: list[nn.Linear]) -> torch.Tensor:
    """Concatenate the weights of ``parts`` and re-point each to a view of the result."""
    fused = torch.cat([p.weight.detach() for p in parts], dim=0).contiguous()  # [sum(out), in]
    start = 0
    for p in parts:
        n = p.weight.shape[0]
        p.weight = nn.Parameter(fused[start : start + n], requires_grad=False)
        start += n
    return fused


class KVCache:
    """Preallocated keys/values for all layers: [L, B, kv_heads, max_len, head_dim]."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype) -> None:
        shape = (layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype)
        self.v = torch.empty(shape, dtype=dtype)
        self.length = 0
        self.max_len = max_len


class FastLlama:
    """Decode-time forward over an HF ``LlamaForCausalLM``'s (fused) weights."""

    def __init__(self, model) -> None:
        cfg = model.config
        self.model = model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.dtype = model.dtype
        # Per layer, by role: the live serving-dtype weights (fused tensors and HF parameters).
        self.layers: list[dict[str, torch.Tensor]] = []
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                {
                    "qkv": _fuse([att.q_proj, att.k_proj, att.v_proj]),
                    "o": att.o_proj.weight,
                    "gu": _fuse([mlp.gate_proj, mlp.up_proj]),
                    "down": mlp.down_proj.weight,
                    "ln1": layer.input_layernorm.weight,
                    "ln2": layer.post_attention_layernorm.weight,
                }
            )
        self.n_q = self.n_heads * self.head_dim
        self.n_k = self.n_kv * self.head_dim
        self.inter = model.model.layers[0].mlp.gate_proj.weight.shape[0]
        # fp32 copies for multi-row ("wide") steps, the same roles; HF names -> views of them.
        self.wide_params: dict[str, torch.Tensor] = {}
        self.wide: list[dict[str, torch.Tensor]] | None = None
        if self.dtype != torch.float32:
            self.wide = [{role: t.float() for role, t in L.items()} for L in self.layers]
            q, k, inter = self.n_q, self.n_k, self.inter
            for i, w in enumerate(self.wide):
                pre = f"model.layers.{i}."
                self.wide_params.update({
                    pre + "self_attn.q_proj.weight": w["qkv"][:q],
                    pre + "self_attn.k_proj.weight": w["qkv"][q : q + k],
                    pre + "self_attn.v_proj.weight": w["qkv"][q + k :],
                    pre + "self_attn.o_proj.weight": w["o"],
                    pre + "mlp.gate_proj.weight": w["gu"][:inter],
                    pre + "mlp.up_proj.weight": w["gu"][inter:],
                    pre + "mlp.down_proj.weight": w["down"],
                    pre + "input_layernorm.weight": w["ln1"],
                    pre + "post_attention_layernorm.weight": w["ln2"],
                })
            self.wide_norm = model.model.norm.weight.float()
            self.wide_params["model.norm.weight"] = self.wide_norm
            head = model.lm_head.weight
            self.wide_head = head.float()
            self.wide_params["lm_head.weight"] = self.wide_head
            if head.data_ptr() == model.model.embed_tokens.weight.data_ptr():  # tied
                self.wide_params["model.embed_tokens.weight"] = self.wide_head
        # The one-token decode step (:meth:`_decode_one`) multiplies by transposed views of the
        # same live tensors (a view, so weight writes show through; it saves an aten::t per
        # product per step) and rotates q/k by a fixed signed permutation matrix.
        self.layers_t = [{role: (t.t() if t.dim() == 2 else t) for role, t in L.items()} for L in self.layers]
        self.head_t = model.lm_head.weight.t()
        half = self.head_dim // 2
        rot = torch.zeros(self.head_dim, self.head_dim)  # x @ rot == cat(-x[half:], x[:half])
        rot[torch.arange(half) + half, torch.arange(half)] = -1.0
        rot[torch.arange(half), torch.arange(half) + half] = 1.0
        self.rot = rot
        theta = cfg.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
        pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float)
        freqs = pos[:, None] * inv_freq[None, :]  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = emb.cos().to(self.dtype)
        self.sin = emb.sin().to(self.dtype)
        self.cos32, self.sin32 = emb.cos(), emb.sin()

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A KV cache, always fp32: a bf16 model's multi-row steps run in fp32 anyway, and for
        its bf16 decode steps attention over the cache is the one product whose size grows with
        the context; a bf16 SDPA over 200 cached positions costs 4-5x an fp32 one on this CPU
        (no bf16 units: 270-400 vs 55-95 us per layer, measured). A bf16 step only casts its
        one query row up and the attention output back down."""
        return KVCache(len(self.layers), batch, self.n_kv, max_len, self.head_dim, torch.float32)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None,
                wide: bool | None = None) -> torch.Tensor:
        """ids, positions [B, S] -> logits of the last position [B, V] (float32).

        ``valid`` [B, T] marks real (non-padding) key positions for the whole cache
        span T = cache.length + S; None means no padding. ``wide``: run this step on the
        fp32 weights (default: when B * S > 1 and the model is not fp32 already).
        """
        b, s = ids.shape
        if wide is None:
            wide = b * s > 1
        wide = bool(wide) and self.wide is not None
        if b == 1 and s == 1 and valid is None and not wide:
            return self._decode_one(ids.view(1), positions.view(1), cache)
        start, end = cache.length, cache.length + s
        if end > cache.max_len:
            raise ValueError("KV cache too short for this generation")
        x = self.model.model.embed_tokens(ids)  # [B, S, H]
        if wide:
            x = x.float()
            cos, sin = self.cos32[positions][:, None], self.sin32[positions][:, None]  # [B, 1, S, D]
        else:
            cos = self.cos[positions][:, None]  # [B, 1, S, D]
            sin = self.sin[positions][:, None]
        mask = None
        causal = False
        if valid is not None:
            q_pos = torch.arange(start, end)[:, None]  # [S, 1]
            k_pos = torch.arange(end)[None, :]  # [1, T]
            allowed = (k_pos <= q_pos)[None] & valid[:, None, :end]  # [B, S, T]
            allowed |= (k_pos == q_pos)[None]  # a padding query sees itself: no empty rows, no NaN
            mask = allowed[:, None]  # [B, 1, S, T]
        elif s > 1:
            if start != 0:
                raise ValueError("multi-token steps after the prefill need a mask")
            causal = True
        for li, W in enumerate(self.wide if wide else self.layers):
            h = self._norm(x, W["ln1"])
            qkv = F.linear(h, W["qkv"])  # [B, S, nq + 2 nk]
            # q and k rotated in one pass (fewer ops per step; decode is partly per-op overhead)
            qk = qkv[..., : self.n_q + self.n_k].view(b, s, self.n_heads + self.n_kv, self.head_dim).transpose(1, 2)
            qk = self._rotate(qk, cos, sin)  # [B, Hq + Hkv, S, D]
            q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
            v = qkv[..., self.n_q + self.n_k :].view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
            cache.k[li, :, :, start:end] = k
            cache.v[li, :, :, start:end] = v
            keys, vals = cache.k[li, :, :, :end], cache.v[li, :, :, :end]  # [B, Hkv, T, D]
            if keys.dtype != q.dtype:  # a bf16 step: attention runs in the cache's fp32 (see new_cache)
                q = q.to(keys.dtype)
            att = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, is_causal=causal, enable_gqa=True)
            x = x + F.linear(att.transpose(1, 2).reshape(b, s, self.n_q).to(x.dtype), W["o"])
            h = self._norm(x, W["ln2"])
            gu = F.linear(h, W["gu"])  # [B, S, 2I]
            x = x + F.linear(F.silu(gu[..., : self.inter]) * gu[..., self.inter :], W["down"])
        cache.length = end
        if wide:
            x = self._norm(x[:, -1], self.wide_norm)  # [B, H]
            return F.linear(x, self.wide_head)  # [B, V] fp32
        x = self.model.model.norm(x[:, -1])  # [B, H]
        return self.model.lm_head(x).float()  # [B, V]

    def _decode_one(self, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The hot loop of chat serving: one token, batch 1, serving-dtype weights, fp32 cache.
        tok, pos [1] -> logits [1, V] float32.

        The same arithmetic as :meth:`forward` in fewer calls (a decode step is ~1/3 per-op
        overhead on this CPU): 2-D activations, residual adds fused into ``addmm``, one
        fused RMSNorm kernel, q/k rotated in fp32 as ``x * cos + (x @ rot) * sin`` in one
        ``addcmul`` and written to the fp32 cache as is. In bf16 it is at least as close to an
        all-fp32 step as :meth:`forward`'s bf16 rotation (SmolLM2, mean |logit error| over
        three steps: 0.05-0.08 against 0.03-0.22); in fp32 it equals :meth:`forward` (tested).
        """
        start = cache.length
        end = start + 1
        if end > cache.max_len:
            raise ValueError("KV cache too short for this generation")
        nq, nk, nh, nkv, d = self.n_q, self.n_k, self.n_heads, self.n_kv, self.head_dim
        x = self.model.model.embed_tokens.weight[tok]  # [1, H]
        cos, sin = self.cos32[pos], self.sin32[pos]  # [1, D]
        for li, W in enumerate(self.layers_t):
            h = self._norm_fused(x, W["ln1"])
            qkv = torch.mm(h, W["qkv"])  # [1, nq + 2 nk]
            qk = qkv[:, : nq + nk].view(nh + nkv, d).float()  # [Hq + Hkv, D]
            qk = torch.addcmul(qk * cos, qk @ self.rot, sin)
            k_cache, v_cache = cache.k[li, 0], cache.v[li, 0]  # [Hkv, T, D]
            k_cache[:, start] = qk[nh:]
            v_cache[:, start] = qkv[:, nq + nk :].view(nkv, d)
            att = F.scaled_dot_product_attention(
                qk[:nh].view(1, nh, 1, d), k_cache[None, :, :end], v_cache[None, :, :end], enable_gqa=True
            )  # [1, Hq, 1, D] fp32
            x = torch.addmm(x, att.view(1, nq).to(x.dtype), W["o"])
            h = self._norm_fused(x, W["ln2"])
            gu = torch.mm(h, W["gu"])  # [1, 2I]
            x = torch.addmm(x, F.silu(gu[:, : self.inter]) * gu[:, self.inter :], W["down"])
        cache.length = end
        return torch.mm(self._norm_fused(x, self.model.model.norm.weight), self.head_t).float()  # [1, V]

    def _norm_fused(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """HF Llama RMSNorm (fp32 statistics, scaled in the weight's dtype) as one kernel."""
        return weight * torch.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(weight.dtype)
