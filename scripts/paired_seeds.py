"""Paired comparison of two groups of finished replay runs, matched by their replay seed.

Usage: .venv/bin/python scripts/paired_seeds.py --base runs/<a0> runs/<a1> ... --lever runs/<b0> runs/<b1> ...
       [--key final_all_pass]

Each run's report.json gives its ``seed`` and the figure (``--key``, default ``final_all_pass``).
Runs are paired by seed (seeds in only one group are listed and left out); the output is one row
per seed, the two means, the mean paired difference with its standard error (sample sd / sqrt n),
and how many seeds went up, stayed, went down. Last line: ONE JSON object (n, base_mean,
lever_mean, mean_diff, se, sd_diff, higher, equal, lower).

Why paired and why the SE matters: with nothing changed but the trainer's seed, the student
replay's per-seed difference has sd 0.188 (docs/replay.md, Session 16, section 4), so seven
seeds resolve only about 0.14 (two standard errors). A difference inside two SE is not a finding.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def load_group(ap: argparse.ArgumentParser, folders: list[Path], key: str, label: str) -> dict[int, float]:
    """seed -> figure for one group; a clear argparse error for anything a user could get wrong."""
    out: dict[int, float] = {}
    for d in folders:
        path = d / "report.json"
        if not path.is_file():
            ap.error(f"{d} has no report.json (not a finished replay run)")
        try:
            r = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            ap.error(f"{path} is not valid JSON ({exc.msg})")
        if key not in r or not isinstance(r[key], (int, float)):
            ap.error(f"{path} has no number under {key!r}")
        if not isinstance(r.get("seed"), int):
            ap.error(f"{path} has no replay seed; pairing needs one")
        if r.get("seed") in out:
            ap.error(f"two {label} runs have seed {r['seed']}; give one run per seed")
        out[r.get("seed")] = float(r[key])
    return out


def paired(base: dict[int, float], lever: dict[int, float]) -> dict:
    seeds = sorted(set(base) & set(lever))
    diffs = [lever[s] - base[s] for s in seeds]
    n = len(diffs)
    sd = statistics.stdev(diffs) if n > 1 else None
    eps = 1e-9  # figures are shares of 13 eval tasks, written with float noise
    return {
        "n": n, "seeds": seeds,
        "base_mean": statistics.mean(base[s] for s in seeds),
        "lever_mean": statistics.mean(lever[s] for s in seeds),
        "mean_diff": statistics.mean(diffs),
        "sd_diff": sd, "se": sd / math.sqrt(n) if sd is not None else None,
        "higher": sum(d > eps for d in diffs), "equal": sum(abs(d) <= eps for d in diffs),
        "lower": sum(d < -eps for d in diffs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", nargs="+", type=Path, required=True, help="run folders of the reference (e.g. the default)")
    ap.add_argument("--lever", nargs="+", type=Path, required=True, help="run folders of the change measured")
    ap.add_argument("--key", default="final_all_pass", help="report.json figure to compare (default final_all_pass)")
    args = ap.parse_args()
    base = load_group(ap, args.base, args.key, "--base")
    lever = load_group(ap, args.lever, args.key, "--lever")
    only = sorted(set(base) ^ set(lever), key=str)
    if not set(base) & set(lever):
        ap.error("no seed is in both groups; nothing to pair")
    res = paired(base, lever)
    print("| seed | base | lever | difference |\n|---|---|---|---|")
    for s in res["seeds"]:
        print(f"| {s} | {base[s]:.3f} | {lever[s]:.3f} | {lever[s] - base[s]:+.3f} |")
    if only:
        print(f"(left out, in one group only: seeds {', '.join(map(str, only))})")
    se = res["se"]
    print(f"\n{args.key} over {res['n']} seeds: base {res['base_mean']:.3f}, lever {res['lever_mean']:.3f}; "
          f"paired difference {res['mean_diff']:+.3f}" + (f" (SE {se:.3f})" if se is not None else " (one seed: no SE)")
          + f"; higher on {res['higher']}, equal on {res['equal']}, lower on {res['lower']}")
    if se is not None:
        inside = abs(res["mean_diff"]) < 2 * se
        print("inside two standard errors: not a finding on its own" if inside
              else "outside two standard errors")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
