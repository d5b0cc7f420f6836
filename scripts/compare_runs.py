"""Compare finished replay runs (their report.json files) in one table and one plot.

Usage: .venv/bin/python scripts/compare_runs.py runs/<run-a> runs/<run-b> ... [--out runs/<name>-compare]
       [--names "label a,label b,..."]   (one label per run; default: the method, made unique)
Prints a table like the paper's Table 3, writes compare.md and plot.png into --out, and ends with
ONE JSON line: {method: {final_score, final_all_pass, base_all_pass, turns_to_all_pass_0.8,
max_distinct4_drop, wall_s}} (the baseline of each run is its own turn-0 evaluation, measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--names", default=None, help="Comma-separated labels, one per run (default: each run's method).")
    args = ap.parse_args()
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    if names is not None and (len(names) != len(args.runs) or len(set(names)) != len(names)):
        ap.error(f"--names needs {len(args.runs)} distinct labels, one per run; got {len(names)}")
    from companion.sim import report as rep

    reports = {}
    for i, d in enumerate(args.runs):
        path = d / "report.json"
        if not path.is_file():
            ap.error(f"{d} has no report.json (not a finished replay run)")
        r = json.loads(path.read_text())
        label = names[i] if names else (r["method"] if r["method"] not in reports else f"{r['method']}-{d.name}")
        reports[label] = r
    table = rep.compare_md(reports)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.md").write_text(table)
        rep.plot_curves(args.out / "plot.png", reports, title="methods compared")
    keys = ("final_score", "final_all_pass", "base_all_pass", "turns_to_all_pass_0.8", "max_distinct4_drop", "wall_s")
    print(json.dumps({m: {k: r[k] for k in keys} for m, r in reports.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
