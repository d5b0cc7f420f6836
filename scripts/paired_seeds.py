"""Paired comparison of two groups of finished replay runs, matched by their replay seed.

Usage: .venv/bin/python scripts/paired_seeds.py --base runs/<a0> runs/<a1> ... --lever runs/<b0> runs/<b1> ...
       [--key final_all_pass | --from-turn 24] [--plot runs/<name>.png --names "default,lever"]

Each run's report.json gives its ``seed`` and the figure (``--key``, default ``final_all_pass``).
``--from-turn T`` compares instead the mean all-pass rate of the evaluations at turn T and later
(the report's ``curve``): one evaluation of 13 eval tasks moves by whole tasks, so a lead at the
last turn alone can be that evaluation's draw (docs/replay.md, Session 20).
Runs are paired by seed (seeds in only one group are listed and left out); the output is one row
per seed, the two means, the mean paired difference with its standard error (sample sd / sqrt n),
and how many seeds went up, stayed, went down; then, where the reports carry them, each
preference's pass rate per group (mean over the paired seeds of the last evaluation, or of the
evaluations at turn T and later with ``--from-turn``) and each group's collapse misses (runs whose
``max_distinct4_drop`` is above 0.1, with the drops). Last line: ONE JSON object (n, base_mean,
lever_mean, mean_diff, se, sd_diff, higher, equal, lower).
With ``--plot`` it also draws both groups' all-pass and distinct-4 curves against turns (each paired
seed thin, the group's mean over those seeds thick; the distinct-4 panel marks the collapse line,
0.1 below the base's turn-0 figure), so a gain at the end cannot hide a dip on the way.

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


def _curve(r: dict, field: str) -> dict[int, float]:
    """turn -> ``field`` of each evaluation in the report's ``curve`` that has both as numbers."""
    return {p["turn"]: p[field] for p in r.get("curve") or []
            if isinstance(p, dict) and isinstance(p.get("turn"), int) and isinstance(p.get(field), (int, float))}


def late_all_pass(r: dict, from_turn: int) -> float | None:
    """Mean all-pass rate of the evaluations at ``from_turn`` and later; None if there are none."""
    xs = [a for t, a in _curve(r, "all_pass").items() if t >= from_turn]
    return statistics.mean(xs) if xs else None


def load_group(ap: argparse.ArgumentParser, folders: list[Path], key: str, label: str,
               reports: dict[int, dict] | None = None, from_turn: int | None = None) -> dict[int, float]:
    """seed -> figure for one group; a clear argparse error for anything a user could get wrong.
    With ``reports``, also fills it with seed -> the whole report (for ``--plot``)."""
    out: dict[int, float] = {}
    for d in folders:
        path = d / "report.json"
        if not path.is_file():
            ap.error(f"{d} has no report.json (not a finished replay run)")
        try:
            r = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            ap.error(f"{path} is not valid JSON ({exc.msg})")
        if from_turn is not None:
            value = late_all_pass(r, from_turn)
            if value is None:
                ap.error(f"{path} has no evaluation at turn {from_turn} or later")
        elif key not in r or not isinstance(r[key], (int, float)):
            ap.error(f"{path} has no number under {key!r}")
        else:
            value = r[key]
        if not isinstance(r.get("seed"), int):
            ap.error(f"{path} has no replay seed; pairing needs one")
        if r.get("seed") in out:
            ap.error(f"two {label} runs have seed {r['seed']}; give one run per seed")
        out[r.get("seed")] = float(value)
        if reports is not None:
            reports[r["seed"]] = r
    return out


def pref_rates(reports: dict[int, dict], seeds: list[int], from_turn: int | None) -> dict[str, float]:
    """preference id -> its pass rate, averaged over ``seeds``: per run, the mean of the evaluations
    at ``from_turn`` and later, or the last evaluation when ``from_turn`` is None. Empty when a run's
    curve has no ``per_pref``."""
    per_run = []
    for s in seeds:
        pts = [p for p in reports[s].get("curve") or [] if isinstance(p, dict) and isinstance(p.get("per_pref"), dict)]
        if from_turn is None:
            pts = pts[-1:]
        else:
            pts = [p for p in pts if isinstance(p.get("turn"), int) and p["turn"] >= from_turn]
        if not pts:
            return {}
        per_run.append({k: statistics.mean(p["per_pref"][k] for p in pts) for k in pts[0]["per_pref"]})
    return {k: statistics.mean(r[k] for r in per_run) for k in per_run[0]}


COLLAPSE_DROP = 0.1  # the target: distinct-4 never more than 0.1 below the base's


def collapse_misses(reports: dict[int, dict], seeds: list[int]) -> list[tuple[int, float]] | None:
    """(seed, drop) of the runs whose max_distinct4_drop is above COLLAPSE_DROP; None if a report lacks it."""
    drops = [(s, reports[s].get("max_distinct4_drop")) for s in seeds]
    if any(not isinstance(d, (int, float)) for _, d in drops):
        return None
    return [(s, float(d)) for s, d in drops if d > COLLAPSE_DROP]


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


def plot_groups(path: Path, groups: dict[str, dict[int, dict]], seeds: list[int]) -> None:
    """All-pass and distinct-4 against turns for each group: thin lines per paired seed, a thick line
    for the mean over the seeds at each evaluated turn (turns every paired run evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    base_d4 = []
    for (name, reps), colour in zip(groups.items(), ("tab:blue", "tab:orange")):
        for ax, field in ((ax1, "all_pass"), (ax2, "distinct4")):
            curves = [_curve(reps[s], field) for s in seeds]
            if field == "distinct4":
                base_d4 += [c[0] for c in curves if 0 in c]  # each run's own turn-0 (base) figure
            for c in curves:
                ax.plot(list(c), list(c.values()), color=colour, alpha=0.25, linewidth=0.8)
            turns = sorted(set.intersection(*(set(c) for c in curves)))
            means = [statistics.mean(c[t] for c in curves) for t in turns]
            ax.plot(turns, means, color=colour, linewidth=2.5, marker="o", label=f"{name} (mean of {len(seeds)})")
    ax1.set_title("all-pass rate (eval)")
    ax1.axhline(0.8, color="grey", linestyle="--", linewidth=1)
    ax2.set_title("distinct-4 of eval replies")
    if base_d4:  # the collapse target: never more than 0.1 below the base's own figure
        ax2.axhline(statistics.mean(base_d4) - 0.1, color="red", linestyle=":", linewidth=1, label="base - 0.1")
    for ax in (ax1, ax2):
        ax.set_xlabel("turn")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"paired seeds {', '.join(map(str, seeds))}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", nargs="+", type=Path, required=True, help="run folders of the reference (e.g. the default)")
    ap.add_argument("--lever", nargs="+", type=Path, required=True, help="run folders of the change measured")
    ap.add_argument("--key", default="final_all_pass", help="report.json figure to compare (default final_all_pass)")
    ap.add_argument("--from-turn", type=int, default=None, metavar="T",
                    help="compare the mean all-pass rate of the evaluations at turn T and later instead of --key")
    ap.add_argument("--plot", type=Path, default=None,
                    help="also write a PNG here: both groups' all-pass and distinct-4 curves, per seed and mean")
    ap.add_argument("--names", default="base,lever", help="the two groups' labels in the plot (default 'base,lever')")
    args = ap.parse_args()
    names = [n.strip() for n in args.names.split(",")]
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        ap.error(f"--names needs two distinct labels separated by a comma; got {args.names!r}")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        ap.error(f"--plot writes a PNG; give a path ending in .png, not {str(args.plot)!r}")
    if args.from_turn is not None and args.key != "final_all_pass":
        ap.error("--from-turn compares the all-pass curve; give it or --key, not both")
    if args.from_turn is not None and args.from_turn < 0:
        ap.error("--from-turn must be a turn number, 0 or more")
    figure = args.key if args.from_turn is None else f"mean all-pass from turn {args.from_turn}"
    base_reports: dict[int, dict] = {}
    lever_reports: dict[int, dict] = {}
    base = load_group(ap, args.base, args.key, "--base", base_reports, args.from_turn)
    lever = load_group(ap, args.lever, args.key, "--lever", lever_reports, args.from_turn)
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
    print(f"\n{figure} over {res['n']} seeds: base {res['base_mean']:.3f}, lever {res['lever_mean']:.3f}; "
          f"paired difference {res['mean_diff']:+.3f}" + (f" (SE {se:.3f})" if se is not None else " (one seed: no SE)")
          + f"; higher on {res['higher']}, equal on {res['equal']}, lower on {res['lower']}")
    if se is not None:
        inside = abs(res["mean_diff"]) < 2 * se
        print("inside two standard errors: not a finding on its own" if inside
              else "outside two standard errors")
    seeds = res["seeds"]
    rates = [pref_rates(base_reports, seeds, args.from_turn), pref_rates(lever_reports, seeds, args.from_turn)]
    if rates[0] and rates[1]:
        where = "the last evaluation" if args.from_turn is None else f"evaluations at turn {args.from_turn} and later"
        print(f"\nper preference ({where}, mean over the paired seeds): base / lever")
        for k in rates[0]:
            if k in rates[1]:
                print(f"  {k}: {rates[0][k]:.3f} / {rates[1][k]:.3f}")
    for name, reps in (("base", base_reports), ("lever", lever_reports)):
        misses = collapse_misses(reps, seeds)
        if misses is not None:
            listed = ", ".join(f"seed {s} {d:.3f}" for s, d in misses)
            print(f"collapse misses ({name}, distinct-4 more than {COLLAPSE_DROP} below the base's): "
                  f"{len(misses)} of {len(seeds)}" + (f" ({listed})" if listed else ""))
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_groups(args.plot, {names[0]: base_reports, names[1]: lever_reports}, res["seeds"])
        print(f"plot: {args.plot}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
