"""Stability trial: a user who is never satisfied (reward -1 on every turn), on-policy, real model.

The measured failure this guards against (NOTES.md): with a constant -1 reward plain
binary RL pushes down whatever was sampled and SmolLM2-135M collapses into
repetition. Each configuration runs the same loop from the base model:
  4 turns sampled by the local engine (temperature 0.7) on training prompts, each
  rewarded -1 -> one trainer update (2 epochs) -> delta applied to the engine ->
  greedy replies on held-out prompts scored for repetition (repeated 3-gram share)
  and length.
Configurations: ``plain`` (no centering, no KL, no entropy floor, no guard) vs
``defaults`` (TrainerConfig()) and any given with --configs.
Last line: JSON {config: {"rep": [per update], "len": [...], "refused": n}}.

Usage: ``.venv/bin/python scripts/train_stability.py --updates 6 --lr 1e-3``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

TRAIN = ["Tell me about the ocean.", "How do I make tea?", "What is a good morning routine?",
         "Explain what a computer does.", "Why do cats purr?", "Give me advice for a job interview.",
         "What should I cook tonight?", "How do plants grow?"]
HELD_OUT = ["What is the best way to learn a language?", "Describe a rainy day.",
            "How does a bicycle work?", "What makes a good friend?"]
CONFIGS = {
    "plain": dict(baseline="none", kl_coef=0.0, entropy_floor=0.0, repetition_guard=False),
    "centering": dict(kl_coef=0.0, entropy_floor=0.0, repetition_guard=False),
    "defaults": dict(),
    # the running mean corrected for its start at 0 (Session 26): constant -1 gives advantage 0
    "mean": dict(baseline="mean"),
}


def chat(q: str) -> list[dict]:
    return [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": q}]


def run(name: str, overrides: dict, args, path: Path) -> dict:
    from backend.samples import build_sample
    from backend.trainer import Trainer, TrainerConfig
    from backend.trainer.trainer import repeated_ngram_fraction
    from companion.engine.local import GenParams, LocalEngine

    torch.manual_seed(0)
    tr = Trainer(TrainerConfig(lr=args.lr, **overrides), model_path=path)
    eng = LocalEngine(path, dtype="bf16", threads=args.threads)

    def probe():
        replies = eng.generate_greedy_batch([chat(q) for q in HELD_OUT], max_new_tokens=args.tokens)
        rep = sum(repeated_ngram_fraction(r.token_ids) for r in replies) / len(replies)
        return rep, sum(len(r.token_ids) for r in replies) / len(replies), replies[0].text

    rep0, len0, text0 = probe()
    out = {"rep": [round(rep0, 3)], "len": [len0], "refused": 0, "loss": []}
    turn = 0
    for u in range(args.updates):
        samples = []
        for _ in range(4):
            q = TRAIN[turn % len(TRAIN)]
            reply = eng.generate(chat(q), GenParams(max_new_tokens=args.tokens, temperature=0.7, top_p=0.9, seed=turn))
            t = {"turn_id": str(turn), "client_id": "trial", "messages": chat(q), "prompt_ids": reply.prompt_ids,
                 "token_ids": reply.token_ids, "logprobs": reply.logprobs, "policy_version": reply.version}
            samples.append(build_sample(t, -1, None, tr.tokenizer))
            turn += 1
        report = tr.update([s for s in samples if s])
        out["refused"] += 0 if report.accepted else 1
        out["loss"].append(round(report.loss, 4))
        eng.apply_delta(tr.export_delta())
        rep, ln, text = probe()
        out["rep"].append(round(rep, 3))
        out["len"].append(ln)
        print(f"[{name}] update {u + 1}: loss {report.loss:+.3f} accepted={report.accepted} "
              f"baseline {report.baseline:+.2f} gap {report.train_serve_gap or 0:.3f} "
              f"held-out repeat {rep:.3f} len {ln:.1f} | {text[:70]!r}", flush=True)
    out["first_reply"], out["last_reply"] = text0[:120], text[:120]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--updates", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--configs", default="plain,centering,defaults")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from companion.config import load_settings
    from companion.models import resolve_model_path

    path = resolve_model_path(load_settings())
    results = {c: run(c, CONFIGS[c], args, path) for c in args.configs.split(",")}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
