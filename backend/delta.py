"""Weight deltas: the one format in which a new policy version travels to serving.

A :class:`Delta` is one policy version, produced by the trainer and applied by a
serving engine (local engine, SGLang). Both sides import this module.

Formats
- ``"lora"``: an HF PEFT adapter (safetensors keys such as
  ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` with shape
  [r, in] and ``...lora_B.weight`` with shape [out, r]; scaling = alpha / r).
  It is *absolute*: the whole adapter over the base model, so it applies on top
  of any earlier version of the same base.
- ``"full"``: replacement tensors in HF naming (``model.layers.0.mlp.up_proj.weight``)
  holding the new values of every trained tensor. Absolute as well when it covers
  every tensor the trainer changes (``meta["absolute"] == "1"``), else incremental.

Invariants
- ``sha256`` is the hex digest of the safetensors payload bytes; :func:`unpack`
  refuses a payload whose digest differs (:class:`DeltaError`).
- ``version`` > ``base_version``; ``base_version`` is the version the trainer
  updated from. A serving engine applies an incremental delta only when it is at
  ``base_version``; an absolute delta when its version is newer than the one serving.
- ``meta["base_fingerprint"]`` names the base model (see
  :func:`companion.models.model_fingerprint`); an engine refuses another base.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMATS = ("lora", "full")
PEFT_PREFIX = "base_model.model."


class DeltaError(ValueError):
    """A delta that must not be applied (bad checksum, wrong base, malformed)."""


@dataclass
class Delta:
    version: int
    base_version: int
    format: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)
    sha256: str = ""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DeltaError(f"unknown delta format {self.format!r}")
        if self.version <= self.base_version:
            raise DeltaError(f"delta version {self.version} must be newer than its base {self.base_version}")
        self.meta = {str(k): str(v) for k, v in self.meta.items()}

    @property
    def absolute(self) -> bool:
        return self.format == "lora" or self.meta.get("absolute") == "1"

    @property
    def lora_scaling(self) -> float:
        return float(self.meta.get("lora_alpha", 16)) / float(self.meta.get("lora_r", 8))

    def header(self) -> dict:
        """JSON-able description that travels beside the payload frame."""
        return {
            "version": self.version,
            "base_version": self.base_version,
            "format": self.format,
            "meta": self.meta,
            "sha256": self.sha256,
        }

    def lora_pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """HF module name (``model.layers.0.self_attn.q_proj``) -> (A [r, in], B [out, r])."""
        if self.format != "lora":
            raise DeltaError("lora_pairs() on a non-LoRA delta")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in self.tensors.items():
            name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
            for part in ("lora_A", "lora_B"):
                marker = f".{part}."
                if marker in name:
                    module = name.split(marker)[0]
                    pairs.setdefault(module, {})[part] = t
        out = {}
        for module, ab in pairs.items():
            if set(ab) != {"lora_A", "lora_B"}:
                raise DeltaError(f"LoRA delta has an unpaired factor for {module}")
            a, b = ab["lora_A"], ab["lora_B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise DeltaError(f"LoRA factors for {module} have shapes {tuple(a.shape)} and {tuple(b.shape)}")
            out[module] = (a, b)
        return out


def pack(delta: Delta) -> tuple[dict, bytes]:
    """Serialize to (header, safetensors bytes); fills ``delta.sha256``."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in delta.tensors.items()}
    payload = st_save(tensors, metadata={"version": str(delta.version)})
    delta.sha256 = hashlib.sha256(payload).hexdigest()
    return delta.header(), payload


def unpack(header: dict, payload: bytes) -> Delta:
    """Inverse of :func:`pack`; raises :class:`DeltaError` on a bad checksum or header."""
    try:
        expected = str(header["sha256"])
        version, base = int(header["version"]), int(header["base_version"])
        fmt, meta = str(header["format"]), dict(header.get("meta") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise DeltaError(f"malformed delta header: {exc}") from None
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise DeltaError(f"delta v{version} checksum mismatch ({actual[:12]} != {expected[:12]})")
    try:
        tensors = st_load(payload)
    except Exception as exc:  # safetensors raises its own error types
        raise DeltaError(f"delta v{version} payload is not valid safetensors: {exc}") from None
    return Delta(version, base, fmt, tensors, meta, sha256=actual)


def save_peft_adapter(delta: Delta, folder: Path) -> Path:
    """Write a LoRA delta as a PEFT adapter folder (loadable by peft and SGLang)."""
    if delta.format != "lora":
        raise DeltaError("only LoRA deltas can be saved as a PEFT adapter")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in delta.tensors.items()}, str(folder / "adapter_model.safetensors"))
    targets = sorted({m.rsplit(".", 1)[-1] for m in delta.lora_pairs()})
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(delta.meta.get("lora_r", 8)),
        "lora_alpha": float(delta.meta.get("lora_alpha", 16)),
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": delta.meta.get("base_model", ""),
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return folder
