"""Replay a simulated persona against the whole system and measure personalization.

One run (:func:`run_replay`):
- the local engine (:class:`companion.engine.local.LocalEngine`) serves every reply,
  sampled (temperature/top_p from the config, seed derived from ``--seed`` and the turn);
- the simulated person (:class:`companion.sim.user.SimulatedUser`) answers it;
- learning methods ``combined | binary | opd``: each turn goes into the journal
  (:class:`companion.journal.Journal`), over the link (:class:`companion.link.Link`) to a
  real backend child process (``companion backend`` via :func:`companion.link.start_local_backend`: real judge, real
  megatron Trainer), judgments and deltas come back and the link applies the deltas to
  the engine;
- ``memory`` (a labelled *baseline*, not the product): the real judge runs in-process and
  each hint it extracts is appended to the system prompt instead of training;
- ``none``: never learns (the real judge still runs in-process so agreement is reported).
- at turn 0 and every ``eval_every`` turns, greedy replies to the held-out eval tasks are
  scored (:mod:`companion.sim.evaluation`), by default beside the replay on a copy of the
  weights served at that turn. Eval prompts are never training turns.

Reproducibility: with ``sync`` (the default for experiments) the driver waits for each
turn's judgment and, when a full training batch is waiting, for the new policy version
before the next turn; the backend trains full batches only. The same seed then replays
the same tasks, reactions and (given deterministic CPU kernels) the same replies.
Without ``sync`` the loops run free, as in the product, and timing decides versions.

Threads: serving uses 1 torch thread by default, the backend child (judge, trainer) every core
(at most 4) with ``sync`` and 1 without. With ``sync`` the two never compute at the same time, so
training can have both cores while serving waits; a 2-thread backend trains bit for bit as a
1-thread one (measured, not derived: Sessions 8 and 12 repeated 1-thread replays reply for reply,
and ``tests/test_trainer_real.py`` checks one update's weights), and a 36-turn student replay
took 493 s instead of 613 s. Serving stays at 1: 2 decoding threads were 10-40% slower on a
shared 2-core machine (batch-1 decoding is too small to split, and a preempted thread stalls its
partner at every barrier), and they do change a replay's replies (Session 11). Both
processes run with OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning
(spinning made 2-thread decoding 4x slower beside other jobs). Evaluations run by default
on a second engine in a thread (:mod:`companion.sim.background_eval`), on the core the
alternation of serving and training leaves idle; they give the replies an inline evaluation
gives.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from companion.config import CHAT_TEMPERATURE
from companion.errors import UserError
from companion.sim.background_eval import BackgroundEvaluator
from companion.sim.evaluation import run_eval
from companion.sim.persona import Persona
from companion.sim.user import SimulatedUser

METHODS = ("combined", "binary", "opd", "none", "memory")
# The replay trains with the product's own learning defaults (backend.stages.METHOD_WEIGHTS, TrainerConfig)
# and samples its training turns at the chat's temperature, so it measures what a person's chat gets.
# Until Session 11 it overrode them (kl_coef 0.2, combined w_opd 0.5, temperature 0.5) where the product
# kept 0.05, 1.0 and 0.7; Session 11 moved the product to the replay's measured settings
# (docs/replay.md, Sessions 3, 10 and 11). Evaluation is always greedy.
REPLAY_TEMPERATURE = CHAT_TEMPERATURE
TRAIN_FAILURES_TO_STOP = 3  # the backend retries a failed update; three in a row stop the replay with its error
MEMORY_HEADER = "\n\nWhat this user told you before (follow it):"


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class ReplayConfig:
    method: str = _help("combined | binary | opd (train through the backend), none (never learns), "
                        "memory (baseline: hints appended to the system prompt).", default="combined")
    turns: int = _help("Assistant replies the simulated person reacts to.", default=36)
    eval_every: int = _help("Evaluate on the eval tasks every N turns (and at turn 0).", default=6)
    seed: int = _help("Seed for task order, reactions and sampling.", default=0)
    max_new_tokens: int = _help("Longest reply, in tokens (training turns and evaluation).", default=160)
    temperature: float = _help("Sampling temperature of training turns (evaluation is always greedy).",
                                default=REPLAY_TEMPERATURE)
    top_p: float = _help("Nucleus sampling of training turns.", default=0.9)
    batch_size: int = _help("Samples per policy update in the backend.", default=4)
    sync: bool = _help("Wait for judgments and due policy versions (reproducible runs).", default=True)
    judge: str = _help("Judge name for backend.judge.load_judge ('embedding' or 'llm').", default="embedding")
    judge_m: int = _help("Judge votes per turn.", default=3)
    threads: int = _help("Torch threads for serving; 0 = every core (at most 4) with sync, where serving and "
                         "training take turns, 1 without. Default 1: on this shared 2-core machine 2 threads were "
                         "slower (docs/replay.md, Session 3).", default=1)
    backend_threads: int = _help(
        "Torch threads of the backend child (judge + trainer); 0 (default) = every core (at most 4) with sync, "
        "where serving waits while it trains, 1 without. Its thread count does not change a replay "
        "(docs/replay.md, Session 12).", default=0)
    background_eval: bool = _help(
        "Evaluate on a second engine in a thread beside the replay (companion.sim.background_eval): the same "
        "replies, on the core that serving and training leave idle. False = inline on the serving engine.",
        default=True)
    wait_timeout_s: float = _help("Longest wait for one judgment or one policy update.", default=600.0)
    trainer_overrides: dict = _help("Extra TrainerConfig fields for the backend (JSON-able) over the "
                                    "product's defaults (kl_coef 0.2; combined w_opd 0.5).",
                                    default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}.")
        if self.turns < 1 or self.eval_every < 1:
            raise UserError("--turns and --eval-every must be at least 1.")
        if self.max_new_tokens < 8:
            raise UserError("--max-new-tokens must be at least 8.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError("--temperature must be >= 0 (0 = greedy) and --top-p in (0, 1].")
        if self.batch_size < 1 or self.judge_m < 1:
            raise UserError("--batch-size and --judge-m must be at least 1.")
        if self.threads < 0 or self.backend_threads < 0:
            raise UserError("--threads and --backend-threads must be 0 (auto) or positive.")
        self.trainer_overrides = dict(self.trainer_overrides or {})
        # Resolved here so report.json's config records the thread counts actually used.
        auto = min(_cores(), 4) if self.sync else 1
        self.threads = self.threads or auto
        self.backend_threads = self.backend_threads or auto


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class TurnRecord:
    turn: int
    session: int
    task: str
    rewrite_of: int | None
    policy_version: int
    reply_words: int
    finish_reason: str
    score: float
    all_pass: bool
    failed: str
    reaction_kind: str
    intended: int
    next_message: str
    judge_reward: int | None
    judge_hint: str | None
    serve_s: float
    judge_s: float | None
    train_wait_s: float
    turn_id: str


@dataclass
class EvalPoint:
    turn: int
    version: int
    score: float
    all_pass: float
    distinct4: float
    per_pref: dict
    seconds: float
    llm_rating: float | None = None  # mean LLM rating of the eval replies (only with an LLM rater)


# ------------------------------------------------------------------ learners
class _InProcessJudge:
    """The real judge in this process (for ``none`` and ``memory``, which have no backend)."""

    def __init__(self, cfg: ReplayConfig) -> None:
        from backend.judge import load_judge

        self.judge = load_judge(cfg.judge, m=cfg.judge_m)

    def judge_turn(self, messages: list[dict], reply: str, next_message: str) -> dict:
        j = self.judge.judge(messages, reply, next_message)
        return {"reward": int(j.reward), "hint": j.hint, "votes": list(j.votes), "judge_name": j.judge_name}


class NoLearner:
    label = "none"

    def __init__(self, cfg: ReplayConfig, engine, run_dir: Path, system_prompt: str) -> None:
        self.base_prompt = system_prompt
        self.judge = _InProcessJudge(cfg)
        self.train_seconds: list[float] = []

    def system_prompt(self) -> str:
        return self.base_prompt

    def new_session(self) -> None:
        pass

    def after_turn(self, messages, reply, next_message) -> tuple[str, dict | None, float, float]:
        t0 = time.perf_counter()
        j = self.judge.judge_turn(messages, reply.text, next_message)
        return str(uuid.uuid4()), j, time.perf_counter() - t0, 0.0

    def close(self) -> None:
        pass


class MemoryLearner(NoLearner):
    """Baseline: hints the judge extracts are appended to the system prompt; no weights change."""

    label = "memory"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.hints: list[str] = []

    def system_prompt(self) -> str:
        if not self.hints:
            return self.base_prompt
        return self.base_prompt + MEMORY_HEADER + "".join(f"\n- {h}" for h in self.hints)

    def after_turn(self, messages, reply, next_message):
        tid, j, judge_s, wait = super().after_turn(messages, reply, next_message)
        if j and j.get("hint") and j["hint"] not in self.hints:
            self.hints.append(j["hint"])
        return tid, j, judge_s, wait


class SystemLearner:
    """Journal -> link -> real backend child (judge + trainer) -> deltas applied to the engine."""

    def __init__(self, cfg: ReplayConfig, engine, run_dir: Path, system_prompt: str, model: str | None = None) -> None:
        from companion.journal import Journal
        from companion.config import load_settings
        from companion.link import Link, start_local_backend

        self.cfg, self.engine, self.base_prompt = cfg, engine, system_prompt
        self.label = cfg.method
        sock_dir = Path(f"/tmp/companion-replay-{uuid.uuid4().hex[:8]}")
        sock_dir.mkdir(mode=0o700)
        self._sock_dir = sock_dir
        self._log_file = run_dir / "backend.log"
        # `companion backend` as a child (state in <run_dir>/backend), full batches only so a
        # seeded replay trains on the same turns every time.
        settings = load_settings(model=model, data_dir=run_dir)
        self.backend = start_local_backend(
            settings,
            extra_args=["--method", cfg.method, "--batch-size", str(cfg.batch_size), "--judge", cfg.judge,
                        "--judge-m", str(cfg.judge_m), "--trainer-json", json.dumps(cfg.trainer_overrides or {}),
                        "--train-after", "0", "--verbose"],  # --verbose: backend.log gets a line per version
            endpoint=f"ipc://{sock_dir}/backend.sock", log_file=self._log_file, ready_timeout=180.0,
            threads=cfg.backend_threads)
        self.journal = Journal(run_dir / "companion.db", client_id=f"replay-{cfg.method}-{cfg.seed}")
        self.link = Link(self.journal, self.backend.endpoint, engine=engine)
        self._judgments: dict[str, dict] = {}
        self._cv = threading.Condition()
        self.link.on_judgment.append(self._on_judgment)
        self.link.on_version.append(lambda v: self._notify())
        self.link.start()
        self.session_id: str | None = None
        self.pending_samples = 0  # judged turns with signal since the last version
        self.train_seconds: list[float] = []

    def _on_judgment(self, msg: dict) -> None:
        with self._cv:
            self._judgments[msg["turn_id"]] = msg
            self._cv.notify_all()

    def _notify(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _check_backend(self) -> None:
        code = self.backend.proc.poll()
        if code is not None:
            raise UserError(f"the replay's backend exited (code {code}, -9 is usually the out-of-memory killer); "
                            "see backend.log in the run folder.")

    def system_prompt(self) -> str:
        return self.base_prompt

    def new_session(self) -> None:
        self.session_id = self.journal.new_session(title=None)

    def after_turn(self, messages, reply, next_message):
        tid = self.journal.record_turn(self.session_id, messages, reply.text, prompt_ids=reply.prompt_ids,
                                       token_ids=reply.token_ids, logprobs=reply.logprobs,
                                       policy_version=reply.version, finish_reason=reply.finish_reason,
                                       ttft_s=reply.ttft_s, decode_s=reply.decode_s)
        t0 = time.perf_counter()
        self.journal.set_next_message(tid, next_message)
        if not self.cfg.sync:
            with self._cv:
                return tid, self._judgments.get(tid), 0.0, 0.0
        deadline = time.time() + self.cfg.wait_timeout_s
        with self._cv:
            while tid not in self._judgments and time.time() < deadline:
                self._check_backend()
                self._cv.wait(timeout=1.0)
            ok = tid in self._judgments
        if not ok:
            raise UserError(f"no judgment from the backend within {self.cfg.wait_timeout_s:.0f} s; see backend.log.")
        judge_s = time.perf_counter() - t0
        j = self._judgments[tid]
        wait = 0.0
        if int(j["reward"]) != 0 or j.get("hint"):
            self.pending_samples += 1
        if self.pending_samples >= self.cfg.batch_size:
            wait = self._wait_for_update()
        return tid, j, judge_s, wait

    def _wait_for_update(self) -> float:
        """Wait until the backend's buffer is trained: a new version applied, or nothing left to train."""
        t0 = time.perf_counter()
        start_version = self.engine.version
        deadline = time.time() + self.cfg.wait_timeout_s
        while time.time() < deadline:
            with self._cv:
                self._cv.wait(timeout=1.0)
            if self.engine.version > start_version:
                break
            self._check_backend()
            st = self.link.request_status(timeout=2.0) or {}
            pipe = st.get("pipeline", st)
            busy = (pipe.get("busy") or {}).get("train")
            queued = sum((pipe.get("train_buffers") or {}).values()) + sum((pipe.get("queues") or {}).values())
            # The backend publishes every version it trains (a refused update too), so a trained
            # version the engine does not serve yet is on its way: wait for it. Without this the
            # replay could go on in the moment between the trainer going idle and the delta being
            # applied, and serve the next turn with the old version (8 of 55 student replays of
            # sessions 1-7 did, at one or two updates; docs/replay.md, Session 8).
            trained = max((pipe.get("policy_versions") or {}).values(), default=0)  # one user per replay backend
            failures = max((pipe.get("train_failures") or {}).values(), default=0)
            if failures >= TRAIN_FAILURES_TO_STOP:  # a failure that repeats will not pass by waiting
                error = next(iter((pipe.get("train_error") or {}).values()), "unknown error")
                raise UserError(f"the backend's update failed {failures} times in a row ({error}); "
                                f"see {self._log_file}.")
            if st and not busy and queued == 0 and trained <= self.engine.version and time.perf_counter() - t0 > 5:
                break  # nothing left to train (e.g. the batch was dropped as stale)
        else:
            raise UserError(f"no policy update within {self.cfg.wait_timeout_s:.0f} s; see backend.log.")
        self.pending_samples = 0
        waited = time.perf_counter() - t0
        self.train_seconds.append(waited)
        return waited

    def close(self) -> None:
        try:
            if self.session_id:
                self.journal.end_session(self.session_id)
            self.link.wait_drained(timeout=10)
        finally:
            self.link.stop()
            self.backend.stop()
            self.journal.close()
            import shutil

            shutil.rmtree(self._sock_dir, ignore_errors=True)


# ------------------------------------------------------------------ the run
def make_run_dir(out: Path, persona: str, method: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = Path(out) / f"{stamp}-{persona}-{method}"
    n = 1
    while d.exists():
        n += 1
        d = Path(out) / f"{stamp}-{persona}-{method}-{n}"
    d.mkdir(parents=True)
    return d


def run_replay(persona: Persona, cfg: ReplayConfig, run_dir: Path, *, model_path: Path, system_prompt: str,
               dtype: str = "bf16", model: str | None = None, progress: bool = True, engine=None,
               user: SimulatedUser | None = None, rater=None) -> dict:
    """Run one replay; writes report.json, turns.csv, plot.png and summary.md into ``run_dir``."""
    from tqdm import tqdm

    from companion.engine.local import DTYPES, GenParams, LocalEngine
    from companion.sim import report as rep

    t_start = time.perf_counter()
    engine = engine or LocalEngine(model_path, dtype=dtype, threads=cfg.threads)
    learner_cls = {"none": NoLearner, "memory": MemoryLearner}.get(cfg.method)
    learner = learner_cls(cfg, engine, run_dir, system_prompt) if learner_cls else \
        SystemLearner(cfg, engine, run_dir, system_prompt, model=model)
    user = user or SimulatedUser(persona, seed=cfg.seed)
    turns: list[TurnRecord] = []
    curve: list[EvalPoint] = []

    def evaluate_on(eng, turn: int, system_prompt: str) -> EvalPoint:
        t0 = time.perf_counter()
        res = run_eval(eng, persona, system_prompt, cfg.max_new_tokens)
        rating = rater.rate_all(persona, res.replies) if rater is not None else None
        (run_dir / "eval_replies").mkdir(exist_ok=True)
        (run_dir / "eval_replies" / f"turn{turn:03d}.json").write_text(json.dumps(
            {"turn": turn, "version": eng.version, "replies": res.replies,
             "failed": [s.failed for s in res.scores]}, indent=1))
        return EvalPoint(turn, eng.version, res.score, res.all_pass, res.distinct4, res.per_pref,
                         time.perf_counter() - t0, rating)

    DTYPE_NAMES = {v: k for k, v in DTYPES.items()}  # the evaluation engine copies the serving one's
    background = None
    if cfg.background_eval and hasattr(engine, "copy_weights_from"):
        background = BackgroundEvaluator(
            engine, lambda: LocalEngine(engine.model_path, dtype=DTYPE_NAMES[engine.dtype], threads=cfg.threads,
                                        fingerprint=engine.fingerprint, use_fast_path=engine.fast is not None),
            evaluate_on)

    def evaluate(turn: int) -> None:
        if background is not None:
            background.submit(turn, learner.system_prompt())
            curve[:] = background.finished
        else:
            curve.append(evaluate_on(engine, turn, learner.system_prompt()))
        if curve:
            bar.set_postfix(all_pass=f"{curve[-1].all_pass:.2f}", v=engine.version)

    interrupted = False
    bar = tqdm(total=cfg.turns, desc=f"{persona.name}/{cfg.method}", unit="turn", disable=not progress)
    try:
        evaluate(0)
        session, turn = 0, 0
        while turn < cfg.turns:
            session += 1
            task = user.next_task()
            learner.new_session()
            messages = [{"role": "system", "content": learner.system_prompt()}, {"role": "user", "content": task.prompt}]
            rewrites, first_turn = 0, None
            while turn < cfg.turns:
                turn += 1
                t0 = time.perf_counter()
                reply = engine.generate(messages, GenParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                                            seed=cfg.seed * 100003 + turn))
                serve_s = time.perf_counter() - t0
                reaction = user.react(task, reply.text, rewrites)
                tid, j, judge_s, wait = learner.after_turn(messages, reply, reaction.text)
                turns.append(TurnRecord(
                    turn, session, task.prompt.splitlines()[0][:80], first_turn, reply.version,
                    len(reply.text.split()), reply.finish_reason, reaction.score.score, reaction.score.all_pass,
                    " ".join(reaction.score.failed), reaction.kind, reaction.intended, reaction.text,
                    None if j is None else int(j["reward"]), None if j is None else j.get("hint"),
                    serve_s, judge_s if j is not None else None, wait, tid))
                first_turn = first_turn or turn
                bar.update(1)
                if turn % cfg.eval_every == 0 or turn == cfg.turns:
                    evaluate(turn)
                if not reaction.rewrite:
                    break
                rewrites += 1
                messages = messages + [{"role": "assistant", "content": reply.text},
                                       {"role": "user", "content": reaction.text}]
        if background is not None:
            curve[:] = background.results()
    except KeyboardInterrupt:
        interrupted = True  # Ctrl-C: keep what was measured, then stop
        if background is not None:
            background.close()
            curve[:] = background.finished
    else:
        interrupted = False
    finally:
        bar.close()
        learner.close()
    if not curve:
        raise KeyboardInterrupt
    report = rep.build_report(persona, cfg, turns, curve, time.perf_counter() - t_start, engine.version,
                              learner.system_prompt() if cfg.method == "memory" else None)
    report["interrupted"] = interrupted
    rep.write_outputs(run_dir, report, turns, curve)
    if interrupted:
        raise KeyboardInterrupt
    return report


def config_dict(cfg: ReplayConfig) -> dict:
    return asdict(cfg)
