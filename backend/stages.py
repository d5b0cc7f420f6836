"""Stage wiring for the backend pipeline (:mod:`backend.loops`).

- :func:`default_stages`: the real system. Judge = ``backend.judge.load_judge("embedding", m=3)``,
  samples = ``backend.samples.build_sample(turn, reward, hint, tokenizer, cfg)``, trainer =
  ``backend.trainer.Trainer(TrainerConfig(), model_path=..., checkpoint_dir=...)`` per user.
  ``companion backend`` uses it unless told otherwise.
- :func:`tiny_stages`: a small but *real* set for tests and the link benchmark, so the link
  can be exercised with real processes in seconds: a cue-word judge, a plain sample, and
  :class:`TinyLoraTrainer` (peft LoRA on any HF Llama folder, one real AdamW step per update,
  atomic checkpoints that record which turn ids each version learned from, absolute LoRA
  deltas in HF PEFT naming). It is not a learning recipe; the real one is backend.trainer.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.loops import Stages

# The learning methods of the paper as trainer weights: binary RL, OPD, or both.
# combined at half the OPD weight: the student replay went 0.154 -> 0.615 all-pass with variety kept,
# against 0.385 and a collapse at w_opd 1.0 (docs/replay.md, Session 3); the replay's default since then,
# the product's since Session 11.
METHOD_WEIGHTS = {"combined": {"w_rl": 1.0, "w_opd": 0.5},
                  "binary": {"w_rl": 1.0, "w_opd": 0.0, "w_teacher_reply": 0.0},  # no hint-driven term at all
                  "opd": {"w_rl": 0.0, "w_opd": 1.0}}


def method_trainer_overrides(method: str, overrides: dict | None) -> dict:
    """TrainerConfig overrides for a method: its weights are defaults an explicit w_rl / w_opd may change.

    A method's zero weight stays zero (``binary`` never uses OPD or teacher-written replies, ``opd``
    never the reward), so one set of overrides serves every method of a ``simulate --compare``.
    (Until 2026-11-21 the method's weights replaced explicit ones, so ``--trainer '{"w_opd": 0.5}'``
    trained combined at w_opd 1.0.)
    """
    out = dict(overrides or {})
    for key, default in METHOD_WEIGHTS[method].items():
        out[key] = 0.0 if default == 0.0 else float(out.get(key, default))
    return out


def default_stages(model_path: Path, fingerprint: str = "", judge_name: str = "embedding", judge_m: int = 3,
                   trainer_overrides: dict | None = None) -> Stages:
    model_path = Path(model_path)

    def judge():
        from backend.judge import load_judge

        return load_judge(judge_name, m=judge_m)

    def sample_builder():
        from transformers import AutoTokenizer

        import backend.samples as samples
        from backend.trainer.config import config_from_overrides

        tok = AutoTokenizer.from_pretrained(str(model_path))
        cfg_cls = getattr(samples, "SampleConfig", None)
        # The trainer's hint_placement decides how the OPD teacher's prompt is built (the one
        # sample setting a replay varies); its default and check live in TrainerConfig.
        placement = config_from_overrides(trainer_overrides or {}).hint_placement
        cfg = cfg_cls(hint_placement=placement) if cfg_cls is not None else None
        return lambda turn, reward, hint: samples.build_sample(turn, reward, hint, tok, cfg)

    def trainer(user: str, checkpoint_dir: Path):
        from backend.trainer import Trainer
        from backend.trainer.config import config_from_overrides

        return Trainer(config_from_overrides(trainer_overrides or {}), model_path=model_path,
                       checkpoint_dir=checkpoint_dir)

    return Stages(judge=judge, sample_builder=sample_builder, trainer=trainer, fingerprint=fingerprint)


# -- the tiny real set ----------------------------------------------------------------------
_NEG = re.compile(r"\b(no|not|wrong|shorter|stop|don't|bad|hate)\b", re.I)
_POS = re.compile(r"\b(thanks|thank you|great|perfect|love|nice|helpful)\b", re.I)


@dataclass
class CueJudgment:
    reward: int
    votes: list[int]
    hint: str | None
    judge_name: str = "cue-words"
    latency: float = 0.0


class CueWordJudge:
    """A deterministic judge on cue words (tests only; the real judge is backend.judge)."""

    def judge(self, context: list[dict], reply: str, next_message: str) -> CueJudgment:
        neg, pos = bool(_NEG.search(next_message)), bool(_POS.search(next_message))
        reward = -1 if neg and not pos else 1 if pos and not neg else 0
        hint = next_message if neg and len(next_message) > 10 else None
        return CueJudgment(reward, [reward] * 3, hint)

    def judge_batch(self, items):
        return [self.judge(*it) for it in items]


@dataclass
class TinySample:
    turn_id: str
    user: str
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    reward: int
    hint: str | None
    teacher_prompt_ids: list[int] | None
    policy_version: int


def tiny_build_sample(turn: dict, reward: int, hint: str | None) -> TinySample | None:
    if reward == 0 and not hint:
        return None
    if not turn["token_ids"]:
        return None
    return TinySample(turn["turn_id"], turn["client_id"], list(turn["prompt_ids"]), list(turn["token_ids"]),
                      list(turn["logprobs"]), reward, hint, None, int(turn["policy_version"]))


class TinyLoraTrainer:
    """LoRA (q,v) on an HF Llama folder; ``update`` = one AdamW step of -reward * log p(reply)."""

    def __init__(self, model_path: Path, checkpoint_dir: Path, r: int = 4, alpha: int = 8, lr: float = 1e-3,
                 slow_s: float = 0.0) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.model_path, self.checkpoint_dir = Path(model_path), Path(checkpoint_dir)
        self.r, self.alpha, self.slow_s = r, alpha, slow_s
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
        self.model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.0, init_lora_weights=True))
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        self.version = 0
        self._resume()

    def _ckpts(self) -> list[tuple[int, Path]]:
        out = []
        for f in self.checkpoint_dir.glob("v*.safetensors"):
            m = re.fullmatch(r"v(\d+)\.safetensors", f.name)
            if m:
                out.append((int(m.group(1)), f))
        return sorted(out)

    def _resume(self) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        ckpts = self._ckpts()
        if ckpts:
            v, f = ckpts[-1]
            set_peft_model_state_dict(self.model, load_file(str(f)))
            self.version = v

    def trained_turn_ids(self) -> dict[int, list[str]]:
        """version -> turn ids it learned from, read back from the checkpoints on disk."""
        from safetensors import safe_open

        out = {}
        for v, f in self._ckpts():
            with safe_open(str(f), "pt") as fh:
                out[v] = json.loads(fh.metadata().get("turn_ids", "[]"))
        return out

    def update(self, samples: list[Any]) -> dict:
        import torch
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        self.model.train()
        self.opt.zero_grad()
        total, n_tok = 0.0, 0
        for s in samples:
            ids = torch.tensor([list(s.prompt_ids) + list(s.response_ids)])  # [1, P+R]
            logits = self.model(input_ids=ids).logits[0, :-1].float()  # [P+R-1, V]
            logp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]  # [P+R-1]
            resp = logp[len(s.prompt_ids) - 1:]  # [R]: log p of the reply tokens
            loss = -(float(s.reward or 0) + (0.1 if s.hint else 0.0)) * resp.mean() / len(samples)
            loss.backward()
            total += loss.item()
            n_tok += len(s.response_ids)
        self.opt.step()
        if self.slow_s:
            time.sleep(self.slow_s)  # lets tests kill the process in the middle of an update
        new = self.version + 1
        state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}
        tmp = self.checkpoint_dir / f".v{new}.tmp"
        save_file(state, str(tmp), metadata={"turn_ids": json.dumps([s.turn_id for s in samples])})
        os.replace(tmp, self.checkpoint_dir / f"v{new}.safetensors")  # the checkpoint is atomic
        self.version = new
        return {"version": new, "loss": total, "n_samples": len(samples), "n_tokens": n_tok,
                "seconds": time.perf_counter() - t0}

    def export_delta(self):
        from peft import get_peft_model_state_dict

        from backend.delta import Delta

        tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        return Delta(self.version, self.version - 1, "lora", tensors,
                     {"lora_r": self.r, "lora_alpha": self.alpha, "base_model": str(self.model_path)})


def tiny_stages(model_path: Path, fingerprint: str = "", slow_s: float = 0.0) -> Stages:
    return Stages(judge=CueWordJudge, sample_builder=lambda: tiny_build_sample,
                  trainer=lambda user, ckpt: TinyLoraTrainer(model_path, ckpt, slow_s=slow_s),
                  fingerprint=fingerprint)
