"""Simulated user, replay driver and report: determinism, the whole system end to end (tiny model)."""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from companion.sim.persona import load_persona
from companion.sim.replay import ReplayConfig, run_replay
from companion.sim.user import SimulatedUser

ROOT = Path(__file__).resolve().parents[1]
LONG_LIST = "Here are the steps, sunlight first:\n" + "\n".join(f"- step {i} is crucial" for i in range(40))


def _csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------ simulated user
def test_same_seed_same_choices_and_only_training_tasks():
    persona = load_persona("student")
    evals = {t.prompt for t in persona.eval_tasks}

    def trace(seed):
        u = SimulatedUser(persona, seed)
        out = []
        for _ in range(60):
            task = u.next_task()
            assert task.prompt not in evals
            r = u.react(task, LONG_LIST)
            out.append((task.prompt, r.text, r.kind, r.rewrite))
        return out

    a, b, c = trace(3), trace(3), trace(4)
    assert a == b and a != c
    assert len({p for p, *_ in a[:44]}) == 44  # a full shuffle of the 44 tasks before any repeats


def test_reactions_follow_the_rules():
    persona = load_persona("student")
    u = SimulatedUser(persona, 0)
    task = next(t for t in persona.tasks if "photosynthesis" in t.prompt)
    good = "Plants use sunlight to turn water and carbon dioxide into sugar, and they let out oxygen."
    kinds = {"praise": 0, "correction": 0, "vague": 0, "neutral": 0}
    for _ in range(400):
        r = u.react(task, good)
        kinds[r.kind] += 1
        assert r.intended == {"praise": 1, "neutral": 0}[r.kind]
        if r.kind == "praise":
            assert r.text in persona.feedback.praise and not r.rewrite
    assert kinds["correction"] == kinds["vague"] == 0 and 0 < kinds["neutral"] < 50
    corrections = 0
    for _ in range(400):
        r = u.react(task, LONG_LIST, rewrites_used=0)
        if r.kind == "neutral":
            continue
        assert r.intended == -1 and r.kind in ("correction", "vague")
        if r.kind == "correction":
            corrections += 1
            assert 1 <= len(r.named) <= 2 and set(r.named) <= {"no-markdown", "plain-words", "short"}
            for pid in r.named:  # each named preference is said in one of its own phrasings
                assert any(c.rstrip(".") in r.text for c in persona.preference(pid).corrections)
        else:
            assert any(v in r.text for v in persona.feedback.vague_complaints)
    assert 0.65 < corrections / 380 < 0.9  # vague_rate 0.2
    # No rewrite request once the session used its rewrites.
    assert not any(u.react(task, LONG_LIST, rewrites_used=persona.feedback.max_rewrites).rewrite for _ in range(50))


# ------------------------------------------------------------------ replay, no learning (fast, deterministic)
def _run(tmp_path, tiny_model_dir, method, name, **kw):
    persona = load_persona("student")
    cfg = ReplayConfig(method=method, turns=kw.pop("turns", 6), eval_every=kw.pop("eval_every", 3), seed=kw.pop("seed", 1),
                       max_new_tokens=kw.pop("max_new_tokens", 12), batch_size=kw.pop("batch_size", 2), **kw)
    run_dir = tmp_path / name
    run_dir.mkdir()
    rep = run_replay(persona, cfg, run_dir, model_path=tiny_model_dir, system_prompt="You are a helpful assistant.",
                     dtype="fp32", model=str(tiny_model_dir), progress=False)
    return persona, rep, run_dir


def test_replay_none_is_reproducible_and_writes_every_output(tmp_path, tiny_model_dir):
    persona, rep, d = _run(tmp_path, tiny_model_dir, "none", "a")
    _, rep2, d2 = _run(tmp_path, tiny_model_dir, "none", "b", background_eval=False)  # same curve evaluated inline
    for f in ("report.json", "turns.csv", "plot.png", "summary.md"):
        assert (d / f).stat().st_size > 0
    saved = json.loads((d / "report.json").read_text())
    for key in ("final_score", "final_all_pass", "base_all_pass", "turns_to_all_pass_0.8", "curve",
                "judge_agreement", "time_per_turn_s"):
        assert key in saved
    assert [p["turn"] for p in saved["curve"]] == [0, 3, 6]
    assert saved["final_version"] == 0 and all(p["version"] == 0 for p in saved["curve"])
    keep = ("turn", "session", "task", "next_message", "reaction_kind", "judge_reward", "reply_words")
    rows, rows2 = _csv(d / "turns.csv"), _csv(d2 / "turns.csv")
    assert len(rows) == 6 and [{k: r[k] for k in keep} for r in rows] == [{k: r[k] for k in keep} for r in rows2]
    evals = {t.prompt.splitlines()[0][:80] for t in persona.eval_tasks}
    assert not evals & {r["task"] for r in rows}  # eval prompts are never training turns
    assert rep["judged_turns"] == 6 and rep["judge_agreement"] is not None
    strip = lambda c: [(p["turn"], p["score"], p["all_pass"], p["distinct4"]) for p in c]  # noqa: E731
    assert strip(rep["curve"]) == strip(rep2["curve"])
    # compare_runs: labelled runs, the seeds named in the title, a clear error for a bad folder
    other_seed = tmp_path / "seed2"
    other_seed.mkdir()
    (other_seed / "report.json").write_text(json.dumps({**saved, "seed": saved["seed"] + 1}))
    cmd = [sys.executable, str(ROOT / "scripts/compare_runs.py"), str(d), str(other_seed), "--names", "none a,none b",
           "--out", str(tmp_path / "cmp")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert f"(seeds {saved['seed']}, {saved['seed'] + 1}, 6 turns)" in out and "| none a" in out and "| none b" in out
    assert set(json.loads(out.strip().splitlines()[-1])) == {"none a", "none b"}
    assert (tmp_path / "cmp" / "plot.png").stat().st_size > 0
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "nothing")], capture_output=True, text=True)
    assert bad.returncode == 2 and "no report.json" in bad.stderr and "Traceback" not in bad.stderr


def test_memory_baseline_puts_judge_hints_in_the_system_prompt(tmp_path, tiny_model_dir):
    _, rep, d = _run(tmp_path, tiny_model_dir, "memory", "m", turns=4, eval_every=4)
    hints = [r["judge_hint"] for r in _csv(d / "turns.csv") if r["judge_hint"]]
    assert rep["baseline"] is True and rep["final_version"] == 0
    if hints:  # the tiny model fails every preference: corrections carry hints
        assert all(h in rep["memory_system_prompt"] for h in hints)
        assert "baseline" in (d / "summary.md").read_text()


# ------------------------------------------------------------------ the whole system (real backend process)
def test_combined_replay_trains_through_journal_link_backend(tmp_path, tiny_model_dir):
    persona, rep, d = _run(tmp_path, tiny_model_dir, "combined", "c", turns=6, eval_every=3, batch_size=2)
    rows = _csv(d / "turns.csv")
    assert rep["final_version"] >= 1, (d / "backend.log").read_text()[-2000:]
    assert rep["curve"][-1]["version"] == rep["final_version"]
    assert all(r["judge_reward"] != "" for r in rows)  # every turn judged by the backend's judge
    db = sqlite3.connect(d / "companion.db")
    n_turns = db.execute("SELECT count(*) FROM turns").fetchone()[0]
    versions = [v for (v,) in db.execute("SELECT version FROM versions ORDER BY version")]
    delivered = db.execute("SELECT count(*) FROM outbox WHERE delivered_at IS NOT NULL").fetchone()[0]
    assert n_turns == 6 and delivered == 6 and versions and versions[-1] == rep["final_version"]
    # later turns were served by newer policy versions
    assert int(rows[-1]["policy_version"]) >= 1
    log = (d / "backend.log").read_text()
    assert all(f": v{v} from 2 samples, loss " in log for v in versions)  # one line per published version
    # the last evaluation, made beside the replay on a copy of the weights, equals an inline
    # evaluation of the backend's last version on a fresh engine
    from backend.loops import read_latest_delta
    from companion.engine.local import LocalEngine
    from companion.sim.evaluation import run_eval

    [user_dir] = (d / "backend" / "users").iterdir()
    fresh = LocalEngine(tiny_model_dir, dtype="fp32")
    fresh.apply_delta(read_latest_delta(user_dir))
    last = json.loads((d / "eval_replies" / "turn006.json").read_text())
    assert last["version"] == fresh.version == rep["final_version"]
    assert run_eval(fresh, persona, "You are a helpful assistant.", 12).replies == last["replies"]
    assert (d / "backend" / "backend.db").exists() or any((d / "backend").iterdir())


def test_cli_simulate_reports_user_errors():
    res = subprocess.run([sys.executable, "-m", "companion.cli", "simulate", "--persona", "nobody", "--turns", "2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "no persona" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "companion.cli", "simulate", "--turns", "0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "--turns" in res.stderr
    res = subprocess.run([sys.executable, "-m", "companion.cli", "simulate", "--top-p", "1.5"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "--top-p" in res.stderr and "Traceback" not in res.stderr


def test_a_dead_backend_is_one_clear_error(tmp_path, tiny_model_dir):
    from companion.engine.local import GenParams, LocalEngine
    from companion.errors import UserError
    from companion.sim.replay import SystemLearner

    engine = LocalEngine(tiny_model_dir, dtype="fp32", threads=1)
    cfg = ReplayConfig(method="combined", batch_size=2, wait_timeout_s=60)
    learner = SystemLearner(cfg, engine, tmp_path, "You are a helpful assistant.", model=str(tiny_model_dir))
    try:
        learner.new_session()
        msgs = [{"role": "user", "content": "hi"}]
        reply = engine.generate(msgs, GenParams(max_new_tokens=4, seed=0))
        learner.backend.proc.kill()  # what the out-of-memory killer does
        learner.backend.proc.wait()
        with pytest.raises(UserError, match="backend exited"):
            learner.after_turn(msgs, reply, "way too long, keep it brief")
    finally:
        learner.close()


# ------------------------------------------------------------------ thread budget
def test_thread_budget_every_core_when_synchronous_one_each_when_free(monkeypatch):
    import companion.sim.replay as replay
    from companion.errors import UserError

    monkeypatch.setattr(replay, "_cores", lambda: 2)
    assert (ReplayConfig().threads, ReplayConfig().backend_threads) == (1, 2)  # the measured default
    assert ReplayConfig(sync=False).backend_threads == 1  # free loops: training beside serving gets one core
    sync = ReplayConfig(threads=0, backend_threads=0)
    assert (sync.threads, sync.backend_threads) == (2, 2)  # auto: serving and training take turns
    free = ReplayConfig(sync=False, threads=0, backend_threads=0)
    assert (free.threads, free.backend_threads) == (1, 1)  # both loops run at once: a core each
    assert (ReplayConfig(threads=0, backend_threads=3).threads, ReplayConfig(backend_threads=3).backend_threads) == (2, 3)
    monkeypatch.setattr(replay, "_cores", lambda: 64)
    assert ReplayConfig(threads=0).threads == 4
    with pytest.raises(UserError, match="--threads"):
        ReplayConfig(backend_threads=-1)


def test_local_backend_gets_its_thread_budget(monkeypatch, tmp_path):
    import io

    import companion.link as link
    from companion.config import load_settings

    seen = []

    class FakeProc:
        def __init__(self, cmd, env=None, **kw):
            seen.append((cmd, env))
            self.stdout, self.returncode = io.BytesIO(b"READY ipc://x\n"), None

        def poll(self):
            return 0

    monkeypatch.setattr(link.subprocess, "Popen", FakeProc)
    settings = load_settings(data_dir=tmp_path)
    link.start_local_backend(settings, ["--method", "binary"], endpoint="ipc://x")
    link.start_local_backend(settings, ["--method", "binary"], endpoint="ipc://x", threads=2)
    link.start_local_backend(settings, ["--train-threads", "3"], endpoint="ipc://x", threads=2)
    (c1, e1), (c2, e2), (c3, e3) = seen
    assert c1[-2:] == ["--train-threads", "1"] and e1["OMP_NUM_THREADS"] == "1"  # the chat's default
    assert c2[-2:] == ["--train-threads", "2"] and e2["OMP_NUM_THREADS"] == e2["MKL_NUM_THREADS"] == "2"
    assert c3.count("--train-threads") == 1 and c3[-1] == "3"  # an explicit flag wins
    assert {e["OMP_WAIT_POLICY"] for e in (e1, e2, e3)} == {"PASSIVE"}


def test_explicit_trainer_weights_win_over_the_method_defaults():
    from backend.stages import method_trainer_overrides as mto

    assert mto("combined", {"w_opd": 1.0, "lr": 6e-4}) == {"w_rl": 1.0, "w_opd": 1.0, "lr": 6e-4}
    assert mto("combined", {}) == {"w_rl": 1.0, "w_opd": 0.5}  # combined trains OPD at half weight
    assert mto("binary", {"w_opd": 0.5}) == {"w_rl": 1.0, "w_opd": 0.0, "w_teacher_reply": 0.0}  # binary never uses OPD
    assert mto("opd", {"w_opd": 0.5, "w_rl": 1.0}) == {"w_rl": 0.0, "w_opd": 0.5}
    assert mto("opd", {}) == {"w_rl": 0.0, "w_opd": 1.0}
    tr = {"teacher_replies": "base", "w_teacher_reply": 0.5}  # hints drive teacher-written replies: never for binary
    assert mto("binary", tr)["w_teacher_reply"] == 0.0
    assert mto("combined", tr) == {**tr, "w_rl": 1.0, "w_opd": 0.5} and mto("opd", tr) == {**tr, "w_rl": 0.0, "w_opd": 1.0}


def test_the_replay_trains_with_the_products_own_learning_defaults():
    """One measured setting: what the replay shows is what a person's chat gets (Session 11)."""
    from backend.stages import method_trainer_overrides as mto
    from backend.trainer.config import TrainerConfig

    assert ReplayConfig().trainer_overrides == {}  # nothing replay-only is layered over the backend
    assert ReplayConfig(trainer_overrides={"lr": 6e-4}).trainer_overrides == {"lr": 6e-4}
    for method, w_opd in (("combined", 0.5), ("opd", 1.0)):
        cfg = TrainerConfig(**mto(method, ReplayConfig(method=method).trainer_overrides))
        assert (cfg.kl_coef, cfg.w_opd) == (0.2, w_opd)
    binary = TrainerConfig(**mto("binary", {}))
    assert (binary.kl_coef, binary.w_opd, binary.w_rl) == (0.2, 0.0, 1.0)
    assert TrainerConfig(**mto("combined", {"kl_coef": 0.05})).kl_coef == 0.05  # explicit wins


def test_replay_samples_training_turns_at_the_chats_temperature():
    from companion.config import CHAT_TEMPERATURE, Settings
    from companion.sim.replay import REPLAY_TEMPERATURE

    assert ReplayConfig().temperature == REPLAY_TEMPERATURE == Settings().temperature == CHAT_TEMPERATURE == 0.5


def test_report_names_each_polarity_flip_with_its_count():
    """A phrasing the judge reads the wrong way round is listed with how often, in report and summary."""
    from companion.sim.replay import EvalPoint, TurnRecord
    from companion.sim.report import build_report, summary_md

    def turn(i, kind, intended, message, reward):
        return TurnRecord(turn=i, session=i, task="t", rewrite_of=None, policy_version=0, reply_words=10,
                          finish_reason="stop", score=1.0, all_pass=intended == 1, failed="", reaction_kind=kind,
                          intended=intended, next_message=message, judge_reward=reward, judge_hint=None,
                          serve_s=0.1, judge_s=0.01, train_wait_s=0.0, turn_id=str(i))

    turns = [turn(1, "praise", 1, "nice, not too long", -1), turn(2, "praise", 1, "nice, not too long", -1),
             turn(3, "praise", 1, "perfect", 1), turn(4, "correction", -1, "shorter please", -1),
             turn(5, "praise", 1, "nice, not too long", 0), turn(6, "vague", -1, "meh", 1)]
    curve = [EvalPoint(0, 0, 0.5, 0.0, 0.9, {}, 1.0), EvalPoint(6, 1, 0.6, 0.2, 0.9, {}, 1.0)]
    r = build_report(load_persona("student"), ReplayConfig(), turns, curve, wall_s=10.0, final_version=1)
    assert r["judge_flips"] == [{"message": "nice, not too long", "intended": 1, "reward": -1, "turns": 2},
                                {"message": "meh", "intended": -1, "reward": 1, "turns": 1}]
    assert r["judge_agreement"] == pytest.approx(2 / 6)
    md = summary_md(r)
    assert "'nice, not too long' meant +1, judged -1 (2x)" in md and "'meh' meant -1, judged +1 (1x)" in md
    r_clean = build_report(load_persona("student"), ReplayConfig(), turns[2:4], curve, wall_s=1.0, final_version=1)
    assert r_clean["judge_flips"] == [] and "polarity flips" not in summary_md(r_clean)


def test_sync_waits_for_a_trained_version_still_on_its_way(monkeypatch):
    # The backend's trainer is idle and has trained version 1, but the delta reaches the engine
    # only 6.5 s later. A synchronous replay must not serve its next turn with version 0
    # (it used to give up after 5 s of an idle, empty backend).
    import threading
    import types

    from companion.sim.replay import SystemLearner

    engine = types.SimpleNamespace(version=0)
    learner = SystemLearner.__new__(SystemLearner)
    learner.cfg, learner.engine = ReplayConfig(wait_timeout_s=30), engine
    learner._cv, learner.pending_samples, learner.train_seconds = threading.Condition(), 4, []
    learner.backend = types.SimpleNamespace(proc=types.SimpleNamespace(poll=lambda: None))
    status = {"busy": {"train": False}, "train_buffers": {}, "queues": {"judge": 0, "sample": 0, "train": 0},
              "policy_versions": {"replay-user": 1}}
    learner.link = types.SimpleNamespace(request_status=lambda timeout: status)
    threading.Timer(6.5, lambda: setattr(engine, "version", 1)).start()
    waited = learner._wait_for_update()
    assert engine.version == 1 and waited >= 6.0 and learner.pending_samples == 0


def test_sync_stops_with_the_backends_error_when_updates_keep_failing(tmp_path):
    # A failure that repeats (a trainer bug) will not pass by waiting: the replay stops with the
    # backend's error instead of waiting out wait_timeout_s (600 s by default).
    import threading
    import time
    import types

    from companion.errors import UserError
    from companion.sim.replay import SystemLearner

    learner = SystemLearner.__new__(SystemLearner)
    learner.cfg, learner.engine = ReplayConfig(wait_timeout_s=300), types.SimpleNamespace(version=0)
    learner._cv, learner.pending_samples, learner.train_seconds = threading.Condition(), 4, []
    learner._log_file = tmp_path / "backend.log"
    learner.backend = types.SimpleNamespace(proc=types.SimpleNamespace(poll=lambda: None))
    status = {"busy": {"train": True}, "train_buffers": {}, "queues": {"judge": 0, "sample": 1, "train": 0},
              "policy_versions": {"replay-user": 0}, "train_failures": {"replay-user": 2},
              "train_error": {"replay-user": "RuntimeError: inplace"}}
    learner.link = types.SimpleNamespace(request_status=lambda timeout: status)
    threading.Timer(2.0, lambda: status["train_failures"].update({"replay-user": 3})).start()
    t0 = time.time()
    with pytest.raises(UserError, match=r"failed 3 times in a row \(RuntimeError: inplace\); see .*backend.log"):
        learner._wait_for_update()
    assert time.time() - t0 < 10


def test_a_plot_of_many_runs_gives_every_run_its_own_colour(tmp_path, monkeypatch):
    # matplotlib's default cycle repeats after ten colours: Session 15's twelve-run comparison drew
    # two runs in one colour. Over ten runs plot_curves takes tab20.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from companion.sim import report as rep

    drawn = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, path, **kw: drawn.append(fig))
    curve = [{"turn": t, "score": 0.5, "all_pass": 0.2} for t in (0, 6)]
    for n in (3, 12):
        rep.plot_curves(tmp_path / "p.png", {f"run {i}": {"curve": curve} for i in range(n)}, title="t")
        colours = [matplotlib.colors.to_hex(line.get_color()) for line in drawn[-1].axes[1].get_lines()[:n]]
        assert len(set(colours)) == n
