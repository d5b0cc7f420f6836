"""Evaluate a judge on the project's held-out follow-ups (default backend/data/followups_heldout2.jsonl).

Prints accuracy, per-class recall, polarity flips (+1 judged -1 or the reverse),
the confusion matrix, hint figures (share of directive -1 messages that yield a
hint, share of hints that keep the directive's key words, hints on messages
without a directive) and mean latency per judgment at batch 1 and batch 16.
Baselines measured in the same run: the majority class, and one word-TF-IDF
logistic regression (no embeddings) fitted on the same training bank.
Last line: one JSON object (accuracy, flips, n, latency_ms = batch 16, ...).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/eval_judge.py [--heldout v2|v3|v1|PATH] [--judge embedding|llm] [--m 3] [--endpoint URL]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from tqdm import tqdm

from backend.judge import load_judge
from backend.judge.data import HELDOUT2_PATH, HELDOUT3_PATH, HELDOUT_PATH, TRAIN_PATH, load_bank

CLASSES = (-1, 0, 1)


def scores(y: np.ndarray, p: np.ndarray) -> dict:
    recall = {str(c): round(float((p[y == c] == c).mean()), 3) for c in CLASSES}
    flips = int(((p * y) == -1).sum())
    conf = [[int(((y == a) & (p == b)).sum()) for b in CLASSES] for a in CLASSES]
    return {"accuracy": round(float((p == y).mean()), 3), "recall": recall, "flips": flips,
            "flip_rate": round(flips / len(y), 3), "confusion": conf}


def baseline_tfidf(train: list[dict], test: list[dict]) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit([r["next"] for r in train])
    clf = LogisticRegression(C=3.0, max_iter=3000, class_weight="balanced")
    clf.fit(vec.transform([r["next"] for r in train]), [r["label"] for r in train])
    return clf.predict(vec.transform([r["next"] for r in test]))


def timed(judge, items, batch: int) -> tuple[list, float]:
    feat = getattr(judge, "featurizer", None)
    if feat is not None:
        feat._memo.clear()   # every message is new in real use: no memo hits while timing
    out, t0 = [], time.perf_counter()
    for i in tqdm(range(0, len(items), batch), desc=f"judging, batch {batch}", leave=False):
        out += judge.judge_batch(items[i:i + batch])
    return out, (time.perf_counter() - t0) / len(items)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", default="embedding", choices=("embedding", "llm"))
    ap.add_argument("--m", type=int, default=3)
    ap.add_argument("--endpoint", help="OpenAI-compatible endpoint for --judge llm (…/v1)")
    ap.add_argument("--model-name", default="default", help="model name sent to the endpoint")
    ap.add_argument("--heldout", default="v2",
                    help="held-out JSONL file, or v2 (followups_heldout2.jsonl, never tuned on; default), "
                         "v3 (followups_heldout3.jsonl, written blind in session 7, never tuned on) "
                         "or v1 (followups_heldout.jsonl, used as a dev set)")
    ap.add_argument("--show-misses", action=argparse.BooleanOptionalAction, default=None,
                    help="print every misjudged message (default: yes, except on held-out v2 and v3, whose "
                         "errors are not read while tuning)")
    ap.add_argument("--cache-dir", help="where fitted heads are cached (default: companion's cache dir)")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.heldout = str({"v1": HELDOUT_PATH, "v2": HELDOUT2_PATH, "v3": HELDOUT3_PATH}.get(args.heldout, args.heldout))
    test = load_bank(args.heldout)
    train = load_bank(TRAIN_PATH)
    y = np.array([r["label"] for r in test])

    t0 = time.perf_counter()
    kw = {"cache_dir": args.cache_dir} if args.judge == "embedding" and args.cache_dir else {}
    if args.judge == "llm":
        kw = {"endpoint": args.endpoint, "model": args.model_name}
    judge = load_judge(args.judge, m=args.m, **kw)
    load_s = time.perf_counter() - t0

    items = [([], "", r["next"]) for r in test]
    judge.judge_batch(items[:4])                 # warm-up (first-call allocations)
    res1, lat1 = timed(judge, items, 1)
    res16, lat16 = timed(judge, items, 16)
    p = np.array([j.reward for j in res16])
    if not np.array_equal(p, np.array([j.reward for j in res1])):
        print("warning: batch 1 and batch 16 disagree on some rewards")

    main_s = scores(y, p)
    maj = max(CLASSES, key=lambda c: sum(r["label"] == c for r in train))
    base_major = scores(y, np.full_like(y, maj))
    base_tfidf = scores(y, baseline_tfidf(train, test))

    # Hints: directive -1 messages (rows with key words) should yield a hint keeping the key words.
    directive = [i for i, r in enumerate(test) if r["label"] == -1 and r.get("keys")]
    hinted = [i for i in directive if res16[i].hint]
    kept = [i for i in hinted if all(k.lower() in res16[i].hint.lower() for k in test[i]["keys"])]
    no_directive = [i for i, r in enumerate(test) if not r.get("keys")]
    spurious = [i for i in no_directive if res16[i].hint]

    print(f"held-out: {args.heldout} ({len(test)} items; train bank {len(train)} items)")
    print(f"judge: {args.judge}, m={args.m}, load {load_s:.1f} s")
    print(f"{'':28s} {'accuracy':>8s} {'flips':>6s}  recall -1/0/+1")
    for name, s in (("judge", main_s), ("baseline: word TF-IDF LR", base_tfidf), ("baseline: majority class", base_major)):
        r = s["recall"]
        print(f"{name:28s} {s['accuracy']:8.3f} {s['flips']:6d}  {r['-1']:.2f}/{r['0']:.2f}/{r['1']:.2f}")
    print("confusion (rows true -1/0/+1, cols judged -1/0/+1):", main_s["confusion"])
    print(f"latency per judgment: batch 1 {lat1 * 1e3:.1f} ms, batch 16 {lat16 * 1e3:.1f} ms")
    print(f"hints: {len(hinted)}/{len(directive)} directive -1 messages yield a hint; "
          f"{len(kept)}/{max(1, len(hinted))} hints keep all key words; "
          f"{len(spurious)}/{len(no_directive)} messages without a directive got a hint")
    show = args.show_misses if args.show_misses is not None else Path(args.heldout).resolve() not in (
        HELDOUT2_PATH.resolve(), HELDOUT3_PATH.resolve())
    for i in (np.where(p != y)[0] if show else []):
        print(f"  miss: true {y[i]:+d} judged {p[i]:+d}  {test[i]['next']}")
    print(json.dumps({
        "accuracy": main_s["accuracy"], "flips": main_s["flips"], "flip_rate": main_s["flip_rate"], "n": len(test),
        "latency_ms": round(lat16 * 1e3, 2), "latency_ms_batch1": round(lat1 * 1e3, 2),
        "recall": main_s["recall"], "judge": args.judge, "m": args.m,
        "hint_yield": round(len(hinted) / max(1, len(directive)), 3),
        "hint_keys_kept": round(len(kept) / max(1, len(hinted)), 3),
        "hint_spurious": round(len(spurious) / max(1, len(no_directive)), 3),
        "baseline_tfidf_accuracy": base_tfidf["accuracy"], "baseline_tfidf_flips": base_tfidf["flips"],
        "baseline_majority_accuracy": base_major["accuracy"], "load_s": round(load_s, 2),
        "heldout": Path(args.heldout).name,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
