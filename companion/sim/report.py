"""Replay outputs: report.json, turns.csv, plot.png, summary.md, and the --compare table.

report.json keys (stable; scripts and docs read them): persona, method, seed, turns,
base_score, base_all_pass, base_distinct4, final_score, final_all_pass, final_distinct4,
``turns_to_all_pass_0.8`` (first evaluated turn with all-pass >= 0.8, null if never),
max_distinct4_drop (base distinct-4 minus the lowest later one), curve (one point per
evaluation: turn, version, score, all_pass, distinct4, per_pref, seconds),
judge_agreement (share of judged turns whose reward equals the simulator's intended
label, with a confusion table), judge_flips (each next message the judge read with the opposite
polarity of the intended label, with how often: one systematic flip can hide in a high agreement),
time_per_turn_s (serving, judging, training wait, total),
wall_s, final_version, config.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

TARGET = 0.8


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def build_report(persona, cfg, turns: list, curve: list, wall_s: float, final_version: int,
                 memory_prompt: str | None = None) -> dict:
    base, final = curve[0], curve[-1]
    reached = next((p.turn for p in curve if p.all_pass >= TARGET), None)
    judged = [t for t in turns if t.judge_reward is not None]
    confusion: dict[str, dict[str, int]] = {}
    for t in judged:
        row = confusion.setdefault(str(t.intended), {})
        row[str(t.judge_reward)] = row.get(str(t.judge_reward), 0) + 1
    agreement = sum(t.judge_reward == t.intended for t in judged) / len(judged) if judged else None
    flips = Counter((t.next_message, t.intended, t.judge_reward) for t in judged if t.judge_reward * t.intended == -1)
    judge_flips = [{"message": m, "intended": i, "reward": r, "turns": c} for (m, i, r), c in flips.most_common()]
    n = len(turns) or 1
    serve = sum(t.serve_s for t in turns) / n
    judge = _mean([t.judge_s for t in turns])
    train = sum(t.train_wait_s for t in turns) / n
    eval_s = sum(p.seconds for p in curve)
    from companion.sim.replay import config_dict

    return {
        "persona": persona.name,
        "method": cfg.method,
        "baseline": cfg.method in ("none", "memory"),
        "seed": cfg.seed,
        "turns": len(turns),
        "base_score": base.score,
        "base_all_pass": base.all_pass,
        "base_distinct4": base.distinct4,
        "final_score": final.score,
        "final_all_pass": final.all_pass,
        "final_distinct4": final.distinct4,
        "turns_to_all_pass_0.8": reached,
        "max_distinct4_drop": max(0.0, base.distinct4 - min(p.distinct4 for p in curve)),
        "curve": [asdict(p) for p in curve],
        "judge_agreement": agreement,
        "judge_confusion_intended_to_reward": confusion,
        "judge_flips": judge_flips,
        "judged_turns": len(judged),
        "reactions": {k: sum(t.reaction_kind == k for t in turns) for k in ("praise", "correction", "vague", "neutral")},
        "train_turn_all_pass": sum(t.all_pass for t in turns) / n,
        "time_per_turn_s": {"serving": serve, "judging": judge, "training_wait": train,
                            "total": (wall_s - eval_s) / n},
        "eval_s_total": eval_s,
        "wall_s": wall_s,
        "final_version": final_version,
        "memory_system_prompt": memory_prompt,
        "config": config_dict(cfg),
    }


def write_outputs(run_dir: Path, report: dict, turns: list, curve: list) -> None:
    run_dir = Path(run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=float))
    with open(run_dir / "turns.csv", "w", newline="") as fh:
        rows = [asdict(t) for t in turns]
        if rows:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    plot_curves(run_dir / "plot.png", {report["method"]: report}, title=f"{report['persona']}: {report['method']}")
    (run_dir / "summary.md").write_text(summary_md(report))


def plot_curves(path: Path, reports: dict[str, dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    # matplotlib's default cycle repeats after 10 colours; a larger comparison takes tab20 so no two runs share one
    colours = plt.get_cmap("tab20").colors if len(reports) > 10 else [None] * len(reports)
    for (name, rep), colour in zip(reports.items(), colours):
        xs = [p["turn"] for p in rep["curve"]]
        ax1.plot(xs, [p["score"] for p in rep["curve"]], marker="o", label=name, color=colour)
        ax2.plot(xs, [p["all_pass"] for p in rep["curve"]], marker="o", label=name, color=colour)
    ax1.set_title("personalization score (eval)")
    ax2.set_title("all-pass rate (eval)")
    ax2.axhline(TARGET, color="grey", linestyle="--", linewidth=1)
    for ax in (ax1, ax2):
        ax.set_xlabel("turn")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _f(x, fmt=".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def summary_md(r: dict) -> str:
    t = r["time_per_turn_s"]
    label = " (baseline, not the product)" if r["method"] == "memory" else ""
    lines = [
        f"# Replay: {r['persona']} / {r['method']}{label}",
        "",
        ("**interrupted**: figures cover the turns run so far\n\n" if r.get("interrupted") else "") +
        f"seed {r['seed']}, {r['turns']} turns, final policy version {r['final_version']}, wall {r['wall_s']:.0f} s",
        "",
        "| | base | final |",
        "|---|---|---|",
        f"| personalization score | {r['base_score']:.3f} | {r['final_score']:.3f} |",
        f"| all-pass rate | {r['base_all_pass']:.3f} | {r['final_all_pass']:.3f} |",
        f"| distinct-4 | {r['base_distinct4']:.3f} | {r['final_distinct4']:.3f} |",
        "",
        f"turns to all-pass >= 0.8: {r['turns_to_all_pass_0.8'] if r['turns_to_all_pass_0.8'] is not None else 'never'}; "
        f"largest distinct-4 drop below base: {r['max_distinct4_drop']:.3f}",
        "",
        f"judge agreement with the simulator's intended label: {_f(r['judge_agreement'])} over {r['judged_turns']} turns "
        f"(intended -> judge reward: {json.dumps(r['judge_confusion_intended_to_reward'])})",
        "",
        *([f"polarity flips (the judge read the opposite of what the person meant): "
           + "; ".join(f"{f['message']!r} meant {f['intended']:+d}, judged {f['reward']:+d} ({f['turns']}x)"
                       for f in r["judge_flips"]), ""] if r.get("judge_flips") else []),
        f"time per turn: serving {_f(t['serving'])} s, judging {_f(t['judging'])} s, "
        f"waiting for training {_f(t['training_wait'])} s, total {_f(t['total'])} s; evaluation {r['eval_s_total']:.0f} s in all",
        "",
        "| turn | version | score | all-pass | distinct-4 | " + " | ".join(r["curve"][0]["per_pref"]) + " |",
        "|---" * (5 + len(r["curve"][0]["per_pref"])) + "|",
    ]
    for p in r["curve"]:
        prefs = " | ".join(f"{v:.2f}" for v in p["per_pref"].values())
        lines.append(f"| {p['turn']} | {p['version']} | {p['score']:.3f} | {p['all_pass']:.3f} | {p['distinct4']:.3f} | {prefs} |")
    if r.get("memory_system_prompt"):
        lines += ["", "Memory baseline's final system prompt:", "", "```", r["memory_system_prompt"], "```"]
    return "\n".join(lines) + "\n"


def compare_md(reports: dict[str, dict]) -> str:
    """A table like the paper's Table 3: one row per method, base and final figures."""
    any_rep = next(iter(reports.values()))
    seeds = sorted({r["seed"] for r in reports.values()})
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds))
    lines = [f"# {any_rep['persona']}: methods compared ({seed_text}, {any_rep['turns']} turns)", "",
             "| method | base score | final score | base all-pass | final all-pass | turns to 0.8 | distinct-4 drop | judge agreement | s/turn |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, r in reports.items():
        name = f"{m} (baseline)" if r["baseline"] else m
        reach = r["turns_to_all_pass_0.8"] if r["turns_to_all_pass_0.8"] is not None else "never"
        lines.append(f"| {name} | {r['base_score']:.3f} | {r['final_score']:.3f} | {r['base_all_pass']:.3f} | "
                     f"{r['final_all_pass']:.3f} | {reach} | {r['max_distinct4_drop']:.3f} | {_f(r['judge_agreement'])} | "
                     f"{_f(r['time_per_turn_s']['total'], '.1f')} |")
    return "\n".join(lines) + "\n"
