"""Done-when demo on the real SmolLM2-135M: binary RL, OPD and combined on hand-made samples.

Shows, in one run:
1. per method, the loss of each update and that the policy moves the right way:
   within each update the batch's PPO loss falls from the first to the last step;
   rewarded replies gain log-prob, punished ones lose it, hinted replies move toward
   the hinted teacher (OPD: mean |teacher - policy| log-prob gap over the reply shrinks);
2. the exported LoRA delta applied to the HF model (peft) gives the trainer's logits
   (fp32 factors: < 1e-4; the default bf16 factors: error printed);
3. resume: a new Trainer on the checkpoint folder continues exactly like the
   uninterrupted one (same loss, same weights);
4. TP=3 (torchrun, 3 processes over gloo) equals TP=1 on the real model.
Last line: one JSON object with the figures. Takes ~5 min on 2 cores.

Usage: ``.venv/bin/python scripts/train_demo.py [--skip-tp]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

QUESTIONS = [
    ("What is the capital of Italy?", "The capital of Italy is Rome.", 1, None),
    ("How many legs does a spider have?",
     "Spiders are fascinating creatures. Spiders are fascinating creatures. Spiders are fascinating.", -1,
     "Just give the number: eight."),
    ("Give me a word that rhymes with cat.", "Hat rhymes with cat.", 1, None),
    ("What color is the sky on a clear day?",
     "The sky is a complex phenomenon studied by many scientists over the centuries and", -1,
     "Answer in one short sentence: it is blue."),
]


def make_samples(tok, method: str):
    from backend.samples import build_sample

    out = []
    for i, (q, a, r, hint) in enumerate(QUESTIONS):
        msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": q}]
        turn = {"turn_id": f"demo{i}", "client_id": "demo", "messages": msgs,
                "token_ids": tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], "policy_version": 0}
        reward = r if method in ("binary", "combined") else 0
        h = hint if method in ("opd", "combined") else None
        s = build_sample(turn, reward, h, tok)
        if s is not None:
            out.append(s)
    return out


def opd_gap(tr, samples) -> float:
    """Mean over hinted replies of |teacher log-prob - policy log-prob| per token (OPD drives it down)."""
    gaps = []
    for s in samples:
        if s.teacher_prompt_ids is None:
            continue
        t, _, _ = tr._score([(s.teacher_prompt_ids, s.response_ids)])
        p, _, _ = tr._score([(s.prompt_ids, s.response_ids)])
        gaps.append(float((t - p).abs().mean()))
    return sum(gaps) / len(gaps) if gaps else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-tp", action="store_true")
    ap.add_argument("--updates", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from backend.delta import save_peft_adapter
    from backend.trainer import Trainer, TrainerConfig
    from backend.trainer.tp_check import full_logits
    from companion.config import load_settings
    from companion.models import resolve_model_path

    path = resolve_model_path(load_settings())
    out: dict = {}
    work = Path(tempfile.mkdtemp(prefix="train-demo-"))
    probe = None
    for method in ("binary", "opd", "combined"):
        cfg = TrainerConfig(delta_dtype="fp32", guard_tokens=16)
        tr = Trainer(cfg, model_path=path, checkpoint_dir=work / method)
        samples = make_samples(tr.tokenizer, method)
        probe = probe or tr.tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of Italy?"}], add_generation_prompt=True,
            tokenize=True, return_dict=True)["input_ids"]
        before, gap0 = tr.score(samples), opd_gap(tr, samples)
        losses = []
        for _ in range(args.updates):
            rep = tr.update(samples)
            # the PPO objective of one batch, first vs last optimizer step of the update
            losses.append((round(rep.loss_first, 4), round(rep.loss_last, 4)))
        after, gap1 = tr.score(samples), opd_gap(tr, samples)
        print(f"\n== {method}: loss (first step, last step) per update {losses}")
        for s, b, a in zip(samples, before, after):
            arrow = "up" if a > b else "down"
            print(f"   reward {s.reward:+d} hint={'y' if s.hint else 'n'}  mean log-prob {b:7.3f} -> {a:7.3f} ({arrow})")
        rl_ok = all((a > b) == (s.reward > 0) for s, b, a in zip(samples, before, after) if s.reward != 0)
        print(f"   rewarded up / punished down: {rl_ok}; OPD teacher-policy gap {gap0:.3f} -> {gap1:.3f}")
        res = {"losses": losses, "loss_falls_within_updates": all(b < a for a, b in losses), "rl_direction_ok": rl_ok if method != "opd" else None,
               "opd_gap_before": round(gap0, 4), "opd_gap_after": round(gap1, 4)}
        if method == "combined":
            # 2. exported delta in HF == trainer logits
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            ref = full_logits(tr, probe)
            hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
            for ddt in ("fp32", "bf16"):
                tr.cfg.delta_dtype = ddt
                folder = save_peft_adapter(tr.export_delta(), work / f"adapter-{ddt}")
                model = PeftModel.from_pretrained(hf, str(folder)).eval()
                with torch.no_grad():
                    got = model(input_ids=torch.tensor([probe])).logits[0]
                out[f"delta_{ddt}_max_logit_err"] = float((got - ref).abs().max())
                hf = model.unload()
                print(f"   HF + exported adapter ({ddt} factors) vs trainer: max |logit diff| "
                      f"{out[f'delta_{ddt}_max_logit_err']:.2e}")
            tr.cfg.delta_dtype = "fp32"
            # 3. resume == uninterrupted
            resumed = Trainer(cfg, model_path=path, checkpoint_dir=work / method)
            r_a, r_b = tr.update(samples), resumed.update(samples)
            same = r_a.loss == r_b.loss and all(torch.equal(p, resumed.trainable[n]) for n, p in tr.trainable.items())
            out["resume_identical"] = bool(same)
            print(f"   resume from v{resumed.resumed_from}: next update loss {r_a.loss:.6f} vs {r_b.loss:.6f}, "
                  f"identical weights: {same}")
            del resumed
        out[method] = res
        del tr
    if not args.skip_tp:
        # 4. TP=3 == TP=1 on the real model
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        one, three = work / "tp1.pt", work / "tp3.pt"
        subprocess.run([sys.executable, "-m", "backend.trainer.tp_check", "--model", str(path), "--out", str(one)],
                       env=env, check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", "-m",
                        "backend.trainer.tp_check", "--model", str(path), "--out", str(three)],
                       env=env, check=True, capture_output=True)
        a, b = torch.load(one), torch.load(three)
        out["tp3_logit_err"] = float((a["logits_before"] - b["logits_before"]).abs().max())
        out["tp3_loss_diff"] = abs(a["loss"] - b["loss"])
        out["tp3_after_step_logit_err"] = float((a["logits_after"] - b["logits_after"]).abs().max())
        print(f"\nTP=3 vs TP=1 (real model): logits {out['tp3_logit_err']:.2e}, loss diff {out['tp3_loss_diff']:.2e}, "
              f"logits after one step {out['tp3_after_step_logit_err']:.2e}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
