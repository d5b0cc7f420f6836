"""Dev-set harness for the CPU judge: 5-fold CV of the training bank (fine-tuning redone per fold) + v1.

Also scores the negation probe (praise that names a flaw in the negative, and complaints with
the same negations) with the whole-bank encoder and heads. Never reads held-out v2.

Step 1 (``features``) fine-tunes MiniLM's top layers for every (fold, seed) on the fold's
training part and stores the message views of every bank, v1 and probe row under that encoder
(``fold = full`` is the whole bank; v1 and the probe are scored with it). Step 2 (``eval``)
fits the heads on the stored features and prints accuracy and polarity flips (CV, v1, both
together as "dev", and the probe) for the vote rules compared; no encoder work.

``--cv-rows N`` scores only the bank's first N rows in the CV (the rows after them are in
every fold's training part): 751 compares banks that differ only by rows appended later on
the same scored rows.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/dev_judge.py features --seeds 0 [--cv-rows 751] [--tag T]
    OMP_NUM_THREADS=1 .venv/bin/python scripts/dev_judge.py eval --seeds 0 [--cv-rows 751] [--tag T] [--margins 0.7 0.8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from backend.judge.data import HELDOUT_PATH, NEGATION_PROBE_PATH, TRAIN_PATH, load_bank

FOLDS = 5


def folds(y: np.ndarray) -> list[np.ndarray]:
    from sklearn.model_selection import StratifiedKFold
    skf = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=0)
    return [te for _, te in skf.split(np.zeros(len(y)), y)]


def _data(args):
    bank, v1, neg = load_bank(args.bank), load_bank(HELDOUT_PATH), load_bank(NEGATION_PROBE_PATH)
    rows = bank + v1 + neg
    texts, y = [r["next"] for r in rows], np.array([r["label"] for r in rows])
    n_cv = args.cv_rows or len(bank)
    return texts, y, len(bank), len(v1), n_cv


def features(args) -> None:
    import torch
    torch.set_num_threads(1)
    from backend.judge.encoder import SentenceEncoder
    from backend.judge.features import Featurizer
    from backend.judge.tune import TuneConfig, train_top_layers, with_top_layers

    texts, y, n, _, n_cv = _data(args)
    base = SentenceEncoder()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for k, te in [("full", np.array([], dtype=int))] + list(enumerate(folds(y[:n_cv]))):
            path = out / f"{args.tag}-s{seed}-f{k}.npy"
            if path.exists():
                continue
            tr = np.setdiff1d(np.arange(n), te)
            t0 = time.perf_counter()
            cfg = TuneConfig(layers=3, epochs=args.epochs, lr=args.lr, seed=seed)
            state = train_top_layers(base, [texts[i] for i in tr], y[tr].tolist(), cfg)
            X = Featurizer(encoder=with_top_layers(base, state, 3, f"dev-{seed}-{k}")).views(texts)
            np.save(path, X)
            print(f"seed {seed} fold {k}: {time.perf_counter() - t0:.0f} s", flush=True)


def evaluate(args) -> None:
    from backend.judge.base import majority_vote
    from backend.judge.embedding import EmbeddingJudgeConfig, _Heads, head_votes

    texts, y, n, n_v1, n_cv = _data(args)
    out = Path(args.out)
    v1, neg = np.arange(n, n + n_v1), np.arange(n + n_v1, len(y))

    def probs(X, tr, te):
        """[len(te), 3 heads (char, word, emb views), 3 classes] from heads fitted on tr."""
        h = _Heads([texts[i] for i in tr], X[tr], y[tr], np.ones(len(tr)), EmbeddingJudgeConfig(m=3, C=args.C, polar_margin=0.0))
        return h.vote([texts[i] for i in te], X[te])[1]

    P_cv, P_v1, P_neg = {}, {}, {}
    for s in args.seeds:
        P_cv[s] = np.zeros((n_cv, 3, 3))
        for k, te in enumerate(folds(y[:n_cv])):
            P_cv[s][te] = probs(np.load(out / f"{args.tag}-s{s}-f{k}.npy"), np.setdiff1d(np.arange(n), te), te)
        # One fit of the whole-bank heads scores v1 and the probe (the rows after the bank).
        P_rest = probs(np.load(out / f"{args.tag}-s{s}-ffull.npy"), np.arange(n), np.arange(n, len(y)))
        P_v1[s], P_neg[s] = P_rest[:n_v1], P_rest[n_v1:]

    def votes(P, margin):             # the judge's own head rule, abstain off as in its default
        return head_votes(P, 0.0, margin)

    def majority(V):
        return np.array([majority_vote([int(x) for x in row]) for row in V])

    recipes = {}
    for margin in args.margins:
        for s in args.seeds:
            recipes[f"seed {s}, 3 view heads, margin {margin}"] = lambda P, s=s, m=margin: majority(votes(P[s], m))
        if len(args.seeds) >= 3:
            ss = args.seeds[:3]
            recipes[f"seeds {ss}: one head each (view i), margin {margin}"] = (
                lambda P, ss=ss, m=margin: majority(np.stack([votes(P[s][:, i], m) for i, s in enumerate(ss)], 1)))
            recipes[f"seeds {ss}: 9 heads, margin {margin}"] = (
                lambda P, ss=ss, m=margin: majority(np.concatenate([votes(P[s], m) for s in ss], 1)))
    ycv, yv1, yneg = y[:n_cv], y[v1], y[neg]

    def cols(p, y_true):              # "accuracy flips" columns of one split
        return f"{(p == y_true).mean():7.3f} {int((p * y_true == -1).sum()):5d}"

    print(f"{'recipe':55s} {'CV acc':>7s} {'flips':>5s} {'v1 acc':>7s} {'flips':>5s} {'dev acc':>7s} {'flips':>5s}"
          f" {'neg acc':>7s} {'flips':>5s}")
    for name, f in recipes.items():
        p1, p2, p3 = f(P_cv), f(P_v1), f(P_neg)
        dev = cols(np.concatenate([p1, p2]), np.concatenate([ycv, yv1]))
        print(f"{name:55s} {cols(p1, ycv)} {cols(p2, yv1)} {dev} {cols(p3, yneg)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("features", "eval"))
    ap.add_argument("--bank", default=str(TRAIN_PATH), help="training bank (JSONL); never a held-out file")
    ap.add_argument("--cv-rows", type=int, default=0, help="score only the bank's first N rows in the CV (0 = all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default=str(Path.home() / ".cache" / "companion" / "judge-dev"))
    ap.add_argument("--tag", default="dev", help="name of the stored feature set")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--C", type=float, default=3.0)
    ap.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.8, 0.9])
    args = ap.parse_args()
    features(args) if args.step == "features" else evaluate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
