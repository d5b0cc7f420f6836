"""How far each update moves the weights: a finished replay's batches, re-trained by a fresh trainer.

Reads the backend store of a replay run (``<run>/backend/backend.db``: which turns made each
version, and each turn's reward and hint), rebuilds the first ``--updates`` batches of samples the
way the backend does (``backend.samples.build_sample``) and trains a fresh trainer on them in the
same order, with the settings given by ``--trainer`` (JSON, as ``companion simulate --trainer``)
over the weights of ``--method`` (as the backend sets them: combined trains OPD at w_opd 0.5).
Per update it prints one JSON line: the batch's rewards, how many samples carry a hint, the loss,
the largest gradient norm before clipping, and the Frobenius norm of the change of every LoRA
product B·A (summed over layers) in that update (``step_norm``) and since the start (``total_norm``).

The batches are the ones the *original* run's policy sampled, so for another setting they are
off-policy: this compares step sizes on the same data, not learning. Used in docs/replay.md
(Session 27) to calibrate SGD against AdamW and to see the teacher persona's gradient sizes.

Usage: ``.venv/bin/python scripts/step_probe.py --run runs/<time>-student-combined --updates 4 --trainer '{"optimizer": "sgd"}'``
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")


def read_batches(db: Path, n: int) -> list[list[tuple[dict, int, str | None]]]:
    """The first n versions' turns, each as (payload, reward, hint), in the order they were trained."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        versions = [json.loads(r[0]) for r in con.execute("select turn_ids from versions order by version")][:n]
        turns = {r[0]: (json.loads(r[1]), int(r[2] or 0), r[3])
                 for r in con.execute("select turn_id, payload, reward, hint from turns")}
    finally:
        con.close()
    return [[turns[t] for t in ids if t in turns] for ids in versions]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a replay run folder (holds backend/backend.db)")
    ap.add_argument("--updates", type=int, default=4, help="how many of its first updates to re-train (default 4)")
    ap.add_argument("--trainer", default="{}", help="trainer settings as JSON, e.g. '{\"optimizer\": \"sgd\"}'")
    ap.add_argument("--method", default="combined", choices=["combined", "binary", "opd"],
                    help="the learning method's weights, as the replay's backend sets them (default combined: w_opd 0.5)")
    ap.add_argument("--model", default=None, help="model folder (default: the configured model)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args()
    db = Path(args.run) / "backend" / "backend.db"
    if not db.is_file():
        ap.error(f"{args.run} is not a replay run folder: {db} does not exist.")
    if args.updates < 1:
        ap.error("--updates must be at least 1.")
    try:
        overrides = json.loads(args.trainer)
        assert isinstance(overrides, dict)
    except (ValueError, AssertionError):
        ap.error(f"--trainer must be a JSON object, not {args.trainer!r}.")

    import torch

    from backend.samples import build_sample
    from backend.trainer import Trainer
    from backend.trainer.config import config_from_overrides
    from backend.trainer.lora import lora_product_norm
    from companion.config import load_settings
    from companion.errors import UserError
    from companion.models import resolve_model_path

    from backend.stages import method_trainer_overrides

    try:
        cfg = config_from_overrides(method_trainer_overrides(args.method, overrides))
    except UserError as e:
        ap.error(str(e))
    if cfg.mode != "lora":
        ap.error("the step norms are of the LoRA products: --trainer mode must be 'lora'.")
    try:
        batches = read_batches(db, args.updates)
    except (sqlite3.Error, ValueError, KeyError) as e:
        ap.error(f"cannot read the backend store {db}: {e}")
    if not batches:
        ap.error(f"{args.run} made no update: nothing to re-train.")
    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else resolve_model_path(load_settings())
    with tempfile.TemporaryDirectory() as ckpt:
        tr = Trainer(cfg, model_path=path, checkpoint_dir=ckpt)
        start = {n: p.detach().clone() for n, p in tr.trainable.items()}
        for v, batch in enumerate(batches, 1):
            samples = [s for s in (build_sample(p, r, h, tr.tokenizer) for p, r, h in batch) if s is not None]
            before = {n: p.detach().clone() for n, p in tr.trainable.items()}
            rep = tr.update(samples)
            print(json.dumps({
                "update": v, "rewards": [s.reward for s in samples],
                "hinted": sum(s.teacher_prompt_ids is not None for s in samples),
                "loss": round(float(rep["loss"]), 4), "grad_norm": round(float(rep.get("grad_norm") or 0.0), 3),
                "accepted": bool(rep["accepted"]),
                "step_norm": round(lora_product_norm(tr.trainable, before), 4),
                "total_norm": round(lora_product_norm(tr.trainable, start), 4),
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
