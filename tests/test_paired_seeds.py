"""scripts/paired_seeds.py: runs are paired by seed, the paired statistics are right, and user
mistakes get a clear message instead of a traceback."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts/paired_seeds.py"


def _runs(tmp_path, name, figures):
    out = []
    for seed, value in figures.items():
        d = tmp_path / f"{name}-{seed}"
        d.mkdir()
        (d / "report.json").write_text(json.dumps({"seed": seed, "final_all_pass": value, "final_score": 0.5}))
        out.append(str(d))
    return out


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


def test_pairs_by_seed_and_reports_the_paired_difference(tmp_path):
    base = _runs(tmp_path, "a", {0: 0.5, 1: 0.6, 2: 0.7, 9: 0.1})
    lever = _runs(tmp_path, "b", {2: 0.8, 0: 0.5, 1: 0.8, 5: 1.0})  # another order; 5 and 9 unpaired
    out = _run("--base", *base, "--lever", *lever)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n"] == 3 and res["seeds"] == [0, 1, 2]
    assert abs(res["base_mean"] - 0.6) < 1e-4 and abs(res["lever_mean"] - 0.7) < 1e-4
    assert abs(res["mean_diff"] - 0.1) < 1e-4  # diffs 0, 0.2, 0.1
    assert abs(res["sd_diff"] - 0.1) < 1e-4 and abs(res["se"] - 0.0577) < 1e-4
    assert (res["higher"], res["equal"], res["lower"]) == (2, 1, 0)
    assert "left out, in one group only: seeds 5, 9" in out.stdout
    assert "inside two standard errors" in out.stdout  # 0.1 < 2 x 0.058


def test_a_clear_difference_is_reported_outside_two_standard_errors(tmp_path):
    base = _runs(tmp_path, "a", {0: 0.2, 1: 0.3, 2: 0.25})
    lever = _runs(tmp_path, "b", {0: 0.8, 1: 0.85, 2: 0.9})
    out = _run("--base", *base, "--lever", *lever, "--key", "final_all_pass")
    assert out.returncode == 0 and "outside two standard errors" in out.stdout


def test_user_mistakes_are_clear_errors(tmp_path):
    a = _runs(tmp_path, "a", {0: 0.5})
    b = _runs(tmp_path, "b", {1: 0.5})
    cases = [
        (["--base", *a, "--lever", *b], "no seed is in both groups"),
        (["--base", *a, "--lever", str(tmp_path / "missing")], "has no report.json"),
        (["--base", *a, "--lever", *a, *a], "two --lever runs have seed 0"),
        (["--base", *a, "--lever", *a, "--key", "nothing"], "has no number under 'nothing'"),
    ]
    for args, message in cases:
        out = _run(*args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def _curved_runs(tmp_path, name, finals):
    """Runs with a per-evaluation curve (turns 0, 6, 12) as the replay writes it."""
    out = []
    for seed, final in finals.items():
        d = tmp_path / f"{name}-{seed}"
        d.mkdir()
        curve = [{"turn": t, "all_pass": a, "distinct4": 0.8 - 0.05 * i}
                 for i, (t, a) in enumerate(((0, 0.1), (6, 0.4), (12, final)))]
        (d / "report.json").write_text(json.dumps({"seed": seed, "final_all_pass": final, "curve": curve}))
        out.append(str(d))
    return out


def test_plot_draws_both_groups_and_user_mistakes_in_its_flags_are_clear(tmp_path):
    base = _curved_runs(tmp_path, "a", {0: 0.5, 1: 0.6})
    lever = _curved_runs(tmp_path, "b", {0: 0.7, 1: 0.6})
    png = tmp_path / "out" / "paired.png"
    out = _run("--base", *base, "--lever", *lever, "--plot", str(png), "--names", "default,rollouts")
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"plot: {png}" in out.stdout
    for args, message in [(["--plot", str(tmp_path / "x.svg")], "ending in .png"),
                          (["--names", "same,same"], "two distinct labels")]:
        bad = _run("--base", *base, "--lever", *lever, *args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_from_turn_compares_the_late_evaluations_not_the_last_one(tmp_path):
    # curves (turns 0, 6, 12): base ends 0.5 / 0.6, lever 0.7 / 0.6; from turn 6 each mean also has 0.4
    base = _curved_runs(tmp_path, "a", {0: 0.5, 1: 0.6})
    lever = _curved_runs(tmp_path, "b", {0: 0.7, 1: 0.6})
    out = _run("--base", *base, "--lever", *lever, "--from-turn", "6")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(res["base_mean"] - 0.475) < 1e-4 and abs(res["lever_mean"] - 0.525) < 1e-4
    assert abs(res["mean_diff"] - 0.05) < 1e-4 and "mean all-pass from turn 6 over 2 seeds" in out.stdout
    for args, message in [(["--from-turn", "13"], "no evaluation at turn 13 or later"),
                          (["--from-turn", "6", "--key", "final_score"], "not both"),
                          (["--from-turn", "-1"], "0 or more")]:
        bad = _run("--base", *base, "--lever", *lever, *args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_per_preference_rates_and_collapse_misses_are_reported(tmp_path):
    def runs(name, prefs_by_seed, drops):
        out = []
        for seed, (early, late) in prefs_by_seed.items():
            d = tmp_path / f"{name}-{seed}"
            d.mkdir()
            curve = [{"turn": 0, "all_pass": 0.1, "per_pref": {"short": 0.0, "answers": 0.0}},
                     {"turn": 24, "all_pass": 0.5, "per_pref": early},
                     {"turn": 36, "all_pass": 0.6, "per_pref": late}]
            (d / "report.json").write_text(json.dumps({"seed": seed, "final_all_pass": 0.6, "curve": curve,
                                                       "max_distinct4_drop": drops[seed]}))
            out.append(str(d))
        return out

    base = runs("a", {0: ({"short": 0.5, "answers": 1.0}, {"short": 1.0, "answers": 1.0}),
                      1: ({"short": 0.0, "answers": 0.5}, {"short": 0.5, "answers": 0.5})}, {0: 0.0, 1: 0.15})
    lever = runs("b", {0: ({"short": 0.0, "answers": 0.0}, {"short": 0.0, "answers": 0.2}),
                       1: ({"short": 1.0, "answers": 1.0}, {"short": 1.0, "answers": 1.0})}, {0: 0.05, 1: 0.08})
    out = _run("--base", *base, "--lever", *lever)
    assert out.returncode == 0, out.stderr
    assert "per preference (the last evaluation" in out.stdout
    assert "  short: 0.750 / 0.500" in out.stdout and "  answers: 0.750 / 0.600" in out.stdout
    out = _run("--base", *base, "--lever", *lever, "--from-turn", "24")
    assert "per preference (evaluations at turn 24 and later" in out.stdout
    # base short: seed 0 mean(0.5, 1.0) = 0.75, seed 1 mean(0, 0.5) = 0.25 -> 0.5; lever: 0 and 1 -> 0.5
    assert "  short: 0.500 / 0.500" in out.stdout and "  answers: 0.750 / 0.550" in out.stdout
    assert "collapse misses (base, distinct-4 more than 0.1 below the base's): 1 of 2 (seed 1 0.150)" in out.stdout
    assert "collapse misses (lever, distinct-4 more than 0.1 below the base's): 0 of 2" in out.stdout
    assert json.loads(out.stdout.strip().splitlines()[-1])["n"] == 2  # the JSON line stays last
