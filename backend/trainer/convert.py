"""Hugging Face Llama-family <-> megatron-core GPTModel: build the model and map weights both ways.

Why hand-written: Megatron-Bridge (NVIDIA's converter) requires Transformer
Engine, mamba-ssm and transformers<5, none of which install on a CPU machine
(see NOTES.md); the Llama mapping is small and exactly testable.

Mapping (per layer i; Megatron name -> HF name):
- ``input_layernorm.weight``                    <- ``input_layernorm.weight``
- ``self_attention.linear_qkv.weight``          <- per KV group g: [q heads of g; k_g; v_g]
  (GQA packing; rows [G * (H/G + 2) * d, hidden])
- ``self_attention.linear_proj.weight``         <- ``self_attn.o_proj.weight``
- ``pre_mlp_layernorm.weight``                  <- ``post_attention_layernorm.weight``
- ``mlp.linear_fc1.weight``                     <- [gate_proj; up_proj] (SwiGLU)
- ``mlp.linear_fc2.weight``                     <- ``mlp.down_proj.weight``
plus ``embedding.word_embeddings.weight`` <- ``model.embed_tokens.weight``,
``decoder.final_layernorm.weight`` <- ``model.norm.weight`` and, when the
embeddings are untied, ``output_layer.weight`` <- ``lm_head.weight``.

Tensor parallelism: column-parallel weights (qkv, fc1, embedding, output)
shard rows, row-parallel ones (proj, fc2) shard columns. qkv shards whole KV
groups (TP must divide the number of KV groups) and fc1 shards gate and up
separately, so each rank holds [gate_r; up_r]. :func:`to_megatron_shard` and
:func:`to_hf_full` are exact inverses (test: ``tests/test_trainer_convert.py``).

Invariant: HF Q/K weights are in the rotate-half layout transformers uses,
which is Megatron's default rotary layout, so no permutation is needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from backend.trainer.dist import ParallelError


@dataclass(frozen=True)
class LlamaShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    eps: float
    rope_theta: float
    tied: bool
    max_pos: int

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "LlamaShape":
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        heads = cfg["num_attention_heads"]
        return cls(
            layers=cfg["num_hidden_layers"],
            hidden=cfg["hidden_size"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            ffn=cfg["intermediate_size"],
            vocab=cfg["vocab_size"],
            eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            max_pos=int(cfg.get("max_position_embeddings", 4096)),
        )

    @classmethod
    def from_folder(cls, path: Path) -> "LlamaShape":
        return cls.from_hf_config(json.loads((Path(path) / "config.json").read_text()))

    def check_tp(self, tp: int) -> None:
        for what, n in (("KV heads", self.kv_heads), ("vocabulary size", self.vocab), ("FFN width", self.ffn)):
            if n % tp:
                raise ParallelError(f"tensor-parallel degree {tp} must divide the model's {what} ({n}).")


def build_gpt_model(shape: LlamaShape, tp: int = 1, params_dtype=torch.float32):
    """An empty megatron-core GPTModel with the Llama architecture (call after init_parallel)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    shape.check_tp(tp)
    cfg = TransformerConfig(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.ffn,
        normalization="RMSNorm",
        layernorm_epsilon=shape.eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=params_dtype,
        # The fused kernels below are CUDA/Apex only.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # Attention softmax in fp32 keeps bf16 log-probs close to fp32.
        attention_softmax_in_fp32=True,
    )
    from .sdpa_attention import SDPAAttention

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    # One fused SDPA kernel instead of the local spec's baddbmm + mask + softmax + bmm (why: sdpa_attention.py).
    spec.submodules.self_attention.submodules.core_attention = SDPAAttention
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=spec,
        vocab_size=shape.vocab,
        max_sequence_length=shape.max_pos,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=shape.tied,
        position_embedding_type="rope",
        rotary_base=int(shape.rope_theta) if float(shape.rope_theta).is_integer() else shape.rope_theta,
    )
    return model


# ---- weight mapping ---------------------------------------------------------------------------

_COL = "col"  # shard dim 0
_ROW = "row"  # shard dim 1
_REP = "rep"  # replicated


def _layer_map(i: int) -> list[tuple[str, str, str]]:
    """(megatron name, hf name, parallel kind) for the simple 1:1 tensors of layer i."""
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    return [
        (m + "input_layernorm.weight", h + "input_layernorm.weight", _REP),
        (m + "self_attention.linear_proj.weight", h + "self_attn.o_proj.weight", _ROW),
        (m + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight", _REP),
        (m + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight", _ROW),
    ]


def _shard(t: torch.Tensor, kind: str, rank: int, tp: int) -> torch.Tensor:
    if kind == _COL:
        return t.chunk(tp, dim=0)[rank]
    if kind == _ROW:
        return t.chunk(tp, dim=1)[rank]
    return t


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: LlamaShape) -> torch.Tensor:
    """[H*d, ...], [G*d, ...], [G*d, ...] -> Megatron's per-group [q_g; k_g; v_g] rows."""
    g, d = shape.kv_heads, shape.head_dim
    per = shape.heads // g
    rest = q.shape[1:]
    qg = q.reshape(g, per * d, *rest)  # [G, H/G*d, ...]
    kg = k.reshape(g, d, *rest)  # [G, d, ...]
    vg = v.reshape(g, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(g * (per + 2) * d, *rest)


def unpack_qkv(qkv: torch.Tensor, shape: LlamaShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_qkv` (works on any trailing dims, e.g. LoRA B [rows, r])."""
    g, d = shape.kv_heads, shape.head_dim
    per = shape.heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (per + 2) * d, *rest)
    q, k, v = grouped.split([per * d, d, d], dim=1)
    return q.reshape(g * per * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest)


def to_megatron_shard(hf: dict[str, torch.Tensor], shape: LlamaShape, rank: int = 0, tp: int = 1) -> dict[str, torch.Tensor]:
    """HF state dict -> this TP rank's Megatron state dict (only the weights the model owns)."""
    out: dict[str, torch.Tensor] = {}
    out["embedding.word_embeddings.weight"] = _shard(hf["model.embed_tokens.weight"], _COL, rank, tp)
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if not shape.tied:
        out["output_layer.weight"] = _shard(hf["lm_head.weight"], _COL, rank, tp)
    for i in range(shape.layers):
        h = f"model.layers.{i}."
        for mname, hname, kind in _layer_map(i):
            out[mname] = _shard(hf[hname], kind, rank, tp)
        q, k, v = (hf[h + f"self_attn.{p}_proj.weight"] for p in "qkv")
        # Whole KV groups per rank: shard after packing (groups are contiguous row blocks).
        out[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = _shard(pack_qkv(q, k, v, shape), _COL, rank, tp)
        gate, up = hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]
        out[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.cat(
            [_shard(gate, _COL, rank, tp), _shard(up, _COL, rank, tp)], dim=0
        )
    return {k: v.contiguous() for k, v in out.items()}


def to_hf_full(shards: list[dict[str, torch.Tensor]], shape: LlamaShape) -> dict[str, torch.Tensor]:
    """All TP ranks' Megatron state dicts (rank order) -> one HF state dict (names it covers only)."""
    tp = len(shards)
    names = shards[0].keys()
    out: dict[str, torch.Tensor] = {}

    def cat(name: str, dim: int) -> torch.Tensor:
        return torch.cat([s[name] for s in shards], dim=dim)

    for name in names:
        if name == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = cat(name, 0)
            if shape.tied:
                continue
        elif name == "output_layer.weight":
            out["lm_head.weight"] = cat(name, 0)
        elif name == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = shards[0][name]
        elif name.startswith("decoder.layers."):
            i = int(name.split(".")[2])
            h = f"model.layers.{i}."
            simple = {m: (hn, kind) for m, hn, kind in _layer_map(i)}
            if name in simple:
                hn, kind = simple[name]
                out[hn] = cat(name, 0) if kind == _COL else cat(name, 1) if kind == _ROW else shards[0][name]
            elif name.endswith("linear_qkv.weight"):
                q, k, v = unpack_qkv(cat(name, 0), shape)
                out[h + "self_attn.q_proj.weight"], out[h + "self_attn.k_proj.weight"] = q, k
                out[h + "self_attn.v_proj.weight"] = v
            elif name.endswith("linear_fc1.weight"):
                halves = [s[name].chunk(2, dim=0) for s in shards]
                out[h + "mlp.gate_proj.weight"] = torch.cat([g for g, _ in halves], dim=0)
                out[h + "mlp.up_proj.weight"] = torch.cat([u for _, u in halves], dim=0)
    del tp
    return out


def load_hf_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a HF folder's safetensors into fp32 CPU tensors."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update({k: v.float() for k, v in load_file(str(f)).items()})
    if not state:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    return state


def load_into(model, shard: dict[str, torch.Tensor]) -> None:
    """Copy a Megatron shard into the model; every weight parameter must be covered."""
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in shard and "lora_" not in n]
    if missing:
        raise KeyError(f"weights missing for {missing[:3]}")
    with torch.no_grad():
        for name, t in shard.items():
            p = params[name]
            if p.shape != t.shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)} != parameter {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
