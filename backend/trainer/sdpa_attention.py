"""Core attention for megatron-core's local layer spec through ``F.scaled_dot_product_attention``.

Why: without Transformer Engine, megatron-core's local spec uses ``DotProductAttention``,
which materialises the [b, heads, s, s] scores with ``baddbmm``, masks them with
``masked_fill`` and runs a separate softmax and dropout, then a second ``bmm``; on this
CPU that was about 10% of a LoRA update of one 256-token sample (profiled: ~200 ms of
2.1 s, forward + backward). PyTorch's SDPA does the same maths in one fused (flash)
kernel with its own backward.

Contract (same as ``DotProductAttention.forward``):
- query [sq, b, np, hn], key / value [sk, b, ng, hn] (ng query groups, np a multiple
  of ng: grouped-query attention), per tensor-parallel partition;
- ``attention_mask`` None means causal; otherwise a bool tensor broadcastable to
  [b, 1, sq, sk], True = masked (megatron's convention);
- returns the context [sq, b, np * hn];
- the softmax scale is megatron's (``self.softmax_scale``, 1/sqrt(hn) by default);
  with ``attention_softmax_in_fp32`` and low-precision inputs the product runs in fp32.
Anything this class does not implement (attention dropout > 0 in training, softmax
offsets, sliding windows, packed sequences) raises instead of silently differing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SDPAAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None or self.softmax_offset is not None:
            raise NotImplementedError("SDPAAttention: packed sequences, attention bias and softmax offsets are not supported")
        if self.training and self.attention_dropout.p > 0:
            raise NotImplementedError("SDPAAttention: attention dropout is not supported")
        if getattr(self.config, "window_size", None) is not None:
            raise NotImplementedError("SDPAAttention: sliding-window attention is not supported")
        sq, b, np_, hn = query.shape
        if attention_mask is None and key.shape[0] != sq:
            raise NotImplementedError("SDPAAttention: a causal call needs as many keys as queries")
        dtype = query.dtype
        if self.config.attention_softmax_in_fp32 and dtype != torch.float32:
            query, key, value = query.float(), key.float(), value.float()
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        mask = None if attention_mask is None else ~attention_mask  # SDPA: True = may attend
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=attention_mask is None and sq > 1,
            scale=self.softmax_scale, enable_gqa=k.shape[1] != np_,
        )  # [b, np, sq, hn]
        return out.to(dtype).permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
