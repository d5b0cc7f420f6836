"""Export the trained policy as a :class:`backend.delta.Delta` in Hugging Face naming.

Contract:
- LoRA: an HF PEFT adapter (keys ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``
  [r, in] / ``...lora_B.weight`` [out, r]). Megatron's fused factors are split
  *exactly*: the qkv adapter's B is un-packed per KV group into q/k/v rows and its A is
  shared by the three (B_q A + B_k A + B_v A stacked == B_qkv A), fc1's B splits into
  gate/up halves per TP shard. So peft, the local engine and SGLang load it unchanged,
  and HF + adapter reproduces the Megatron logits (tested within 1e-4 with fp32 factors).
- Full: the HF tensors of every trained weight (``meta["absolute"] = "1"``).
- Collective: every TP rank must call the export functions (they all-gather shards);
  every rank gets the same tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from backend.delta import PEFT_PREFIX
from backend.trainer.convert import LlamaShape, to_hf_full, unpack_qkv


def _gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def _gather_list(t: torch.Tensor) -> list[torch.Tensor]:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return [t.detach().clone()]
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return parts


def lora_tensors(model, shape: LlamaShape, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Megatron LoRA factors (all TP ranks) -> PEFT adapter state dict in HF naming."""
    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if not hasattr(m, "lora_A"):
            continue
        i = int(name.split(".")[2])
        hf = f"{PEFT_PREFIX}model.layers.{i}."
        suffix = name.rsplit(".", 1)[-1]
        if m.lora_kind == "col":
            a = m.lora_A.detach().clone()  # [r, in] replicated
            b_parts = _gather_list(m.lora_B)  # each [out/tp, r]
        else:
            a = _gather(m.lora_A, dim=1)  # [r, in]
            b = m.lora_B.detach().clone()  # [out, r]
        if suffix == "linear_qkv":
            q, k, v = unpack_qkv(torch.cat(b_parts, 0), shape)
            pieces = {"self_attn.q_proj": (a, q), "self_attn.k_proj": (a, k), "self_attn.v_proj": (a, v)}
        elif suffix == "linear_fc1":
            halves = [p.chunk(2, dim=0) for p in b_parts]
            gate = torch.cat([g for g, _ in halves], 0)
            up = torch.cat([u for _, u in halves], 0)
            pieces = {"mlp.gate_proj": (a, gate), "mlp.up_proj": (a, up)}
        elif suffix == "linear_proj":
            pieces = {"self_attn.o_proj": (a, b)}
        else:
            pieces = {"mlp.down_proj": (a, b)}
        for mod, (fa, fb) in pieces.items():
            # clone: q/k/v (and gate/up) share A, and safetensors refuses aliased tensors
            out[f"{hf}{mod}.lora_A.weight"] = fa.to(dtype).clone().contiguous()
            out[f"{hf}{mod}.lora_B.weight"] = fb.to(dtype).clone().contiguous()
    return out


def full_tensors(model, shape: LlamaShape) -> dict[str, torch.Tensor]:
    """All weights, gathered over TP and renamed to HF (the tied lm_head is left implicit)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    mine = {n: p.detach() for n, p in model.named_parameters() if "lora_" not in n}
    shards: list[dict[str, torch.Tensor]] = [dict() for _ in range(tp)]
    for n, t in mine.items():
        parts = _gather_list(t) if tp > 1 else [t.clone()]
        for r in range(tp):
            shards[r][n] = parts[r]
    return to_hf_full(shards, shape)
