"""megatron-core trainer: HF<->Megatron conversion, CPU shims, LoRA, PPO/OPD loss, deltas, checkpoints.

Public interface: ``Trainer``, ``TrainerConfig``, ``UpdateReport`` (see trainer.py).
Imports are lazy so ``import backend.trainer`` stays cheap for callers that only need the config.
"""

from __future__ import annotations

__all__ = ["Trainer", "TrainerConfig", "UpdateReport"]


def __getattr__(name):
    if name == "TrainerConfig":
        from backend.trainer.config import TrainerConfig

        return TrainerConfig
    if name in ("Trainer", "UpdateReport"):
        from backend.trainer import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
