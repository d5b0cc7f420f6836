"""Does any move of the weights break a persona's eval replies, or only the one learning makes?

Moves the base model by a random LoRA delta of a given size and measures the persona's eval
replies as the replay does (greedy, ``companion.sim.evaluation.run_eval``, 160 tokens, the
product's system prompt): score and pooled distinct-4 share, against the base's. The size is the
Frobenius norm of the change of every LoRA product B·A summed over layers, the measure
``scripts/step_probe.py`` prints for real updates (one AdamW update at the defaults: about 0.2-0.46),
so a random move can be compared with a learned one of the same size. The random direction: the
trainer's initial A factors (seeded), B drawn from a standard normal, then scaled to the size.

One JSON line per move; the first line is the base. Used in docs/replay.md, Session 27.

Usage: ``.venv/bin/python scripts/random_move.py --persona teacher --norms 0.09,0.35,1.0 --seeds 0,1,2``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")


def _numbers(text: str, kind, name: str, ap) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--{name} must be a comma-separated list of numbers, not {text!r}.")
    if not values:
        ap.error(f"--{name} is empty.")
    return values


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persona", default="teacher", help="persona name or file (default teacher)")
    ap.add_argument("--norms", default="0.09,0.35,1.0", help="sizes of the moves (B·A norm), comma-separated")
    ap.add_argument("--seeds", default="0,1,2", help="random directions per size, comma-separated seeds")
    ap.add_argument("--model", default=None, help="model folder (default: the configured model)")
    ap.add_argument("--tokens", type=int, default=160, help="longest eval reply (the replay's default, 160)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args()
    norms = _numbers(args.norms, float, "norms", ap)
    seeds = _numbers(args.seeds, int, "seeds", ap)
    if any(n <= 0 for n in norms):
        ap.error("--norms must all be positive.")
    if args.tokens < 8:
        ap.error("--tokens must be at least 8.")

    from companion.errors import UserError
    from companion.sim.persona import load_persona

    try:
        persona = load_persona(args.persona)
    except UserError as e:
        ap.error(str(e))

    import torch

    from backend.trainer import Trainer, TrainerConfig
    from backend.trainer.lora import lora_product_norm
    from companion.config import load_settings
    from companion.engine.local import LocalEngine
    from companion.models import resolve_model_path
    from companion.sim.evaluation import run_eval

    torch.set_num_threads(args.threads)
    settings = load_settings()
    path = Path(args.model) if args.model else resolve_model_path(settings)

    def measure(engine) -> tuple[float, float]:
        res = run_eval(engine, persona, settings.system_prompt, args.tokens)
        return res.score, res.distinct4

    base_score, base_d4 = measure(LocalEngine(path, dtype="bf16", threads=args.threads))
    print(json.dumps({"norm": 0.0, "seed": None, "score": round(base_score, 3), "distinct4": round(base_d4, 3)}), flush=True)
    for norm in norms:
        for seed in seeds:
            with tempfile.TemporaryDirectory() as ckpt:
                tr = Trainer(TrainerConfig(seed=1234 + seed), model_path=path, checkpoint_dir=ckpt)
                zero = {n: p.detach().clone() for n, p in tr.trainable.items()}  # B = 0: the base
                gen = torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    bs = [p for n, p in tr.trainable.items() if n.endswith("lora_B")]
                    for p in bs:
                        p.copy_(torch.randn(p.shape, generator=gen))
                    scale = norm / lora_product_norm(tr.trainable, zero)  # B·A is linear in B
                    for p in bs:
                        p.mul_(scale)
                size = lora_product_norm(tr.trainable, zero)
                tr.version = 1  # export the random move as the first version
                engine = LocalEngine(path, dtype="bf16", threads=args.threads)
                engine.apply_delta(tr.export_delta())
                score, d4 = measure(engine)
            print(json.dumps({"norm": round(size, 4), "seed": seed, "score": round(score, 3),
                              "distinct4": round(d4, 3), "drop": round(base_d4 - d4, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
