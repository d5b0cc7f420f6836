"""The judge: majority vote, the CPU embedding judge (real MiniLM, real sklearn), its cache,
explicit feedback (real SQLite), the CLI and ``python -m backend.judge``."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from backend.judge import Judgment, majority_vote
from backend.judge.data import HELDOUT2_PATH, HELDOUT3_PATH, HELDOUT_PATH, NEGATION_PROBE_PATH, load_bank
from companion.errors import UserError
import judge_support as js


@pytest.mark.parametrize("votes,reward", [
    ([1, 1, -1], 1), ([-1, -1, 0], -1), ([1, -1, 0], 0), ([1, -1], 0), ([0, 0, 1], 0),
    ([], 0), ([1], 1), ([-1, -1, 1, 1, 0], 0), ([-1, 1, -1, 1, -1], -1),
])
def test_majority_vote_and_ties(votes, reward):
    assert majority_vote(votes) == reward


def test_invalid_votes_and_explicit_judgment():
    with pytest.raises(ValueError):
        majority_vote([2])
    with pytest.raises(ValueError):
        Judgment(reward=3, votes=[])
    j = Judgment.explicit(-1)
    assert (j.reward, j.votes, j.judge_name) == (-1, [-1], "explicit")
    with pytest.raises(ValueError):
        Judgment.explicit(0)


# Phrasings written for this test only (in neither bank file): the head must generalise.
UNSEEN = [
    ("Cheers, the macro works a treat now.", 1),
    ("Superb, you explained the Krebs cycle far better than my lecturer.", 1),
    ("This doesn't compile: error: expected ';' before '}' token", -1),
    ("I wanted it in French, not German.", -1),
    ("Far too wordy, give me two lines max.", -1),
    ("What's the population of Kenya?", 0),
    # sincere slang / plain praise that the judge before the 2026-11-21 session-3 bank rows judged -1 or 0
    ("Sick, the deploy went through without a hitch.", 1),
    ("Fine by me, the schedule works for everyone.", 1),
]


def test_embedding_judge_on_unseen_phrasings():
    j = js.judge(3)
    res = j.judge_batch([([], "some reply", t) for t, _ in UNSEEN])
    got = [r.reward for r in res]
    assert got == [lab for _, lab in UNSEEN]
    for r in res:
        assert len(r.votes) == 3 and set(r.votes) <= {-1, 0, 1}
        assert r.reward == majority_vote(r.votes)
        assert r.judge_name == "embedding" and r.latency > 0


@pytest.mark.parametrize("path,min_acc,max_flips", [
    (HELDOUT_PATH, 0.90, 3),      # v1, a dev set: measured 0.910 and 2 of 111
    (HELDOUT2_PATH, 0.91, 3),     # v2, never tuned on: measured 0.922 and 3 of 153 (target <= 2% = 3)
    # negated praise / complaints, a dev set: measured 0.525 and 10 of 40, a known weakness
    # (docs/judge.md, Session 6: the bank rows that fix it were measured and not kept)
    (NEGATION_PROBE_PATH, 0.50, 10),
    # v3, written blind in session 7, never tuned on: measured 0.753 and 11 of 166 at its first look,
    # far below v2's figures (docs/judge.md, Session 7): a guard at the measured level, not a target met
    (HELDOUT3_PATH, 0.75, 11),
], ids=["v1", "v2", "negation", "v3"])
def test_heldout_accuracy_and_flips(path, min_acc, max_flips):
    """Regression guard at the measured level (docs/judge.md)."""
    rows = load_bank(path)
    y = np.array([r["label"] for r in rows])
    p = np.array([r.reward for r in js.judge(3).judge_batch([([], "", r["next"]) for r in rows])])
    assert (p == y).mean() >= min_acc
    assert int(((p * y) == -1).sum()) <= max_flips


def test_polar_margin_turns_a_split_polar_vote_into_zero():
    """A head votes -1/+1 only when that polarity beats the opposite one by polar_margin."""
    from backend.judge.embedding import _Heads

    class Fixed:                                   # a fitted head stand-in with fixed probabilities
        classes_ = np.array([-1, 0, 1])

        def predict_proba(self, X):
            return np.array([[0.10, 0.02, 0.88],   # clear +1: margin 0.78
                             [0.40, 0.05, 0.55],   # +1 but -1 close behind: margin 0.15
                             [0.90, 0.05, 0.05],   # clear -1
                             [0.20, 0.70, 0.10]])  # 0 stays 0
    heads = object.__new__(_Heads)
    heads.abstain, heads.polar_margin, heads.vec = 0.0, 0.7, {}
    heads.members = [("emb", Fixed())] * 3
    votes, _ = heads.vote(["a", "b", "c", "d"], np.zeros((4, 2)))
    assert votes[:, 0].tolist() == [1, 0, -1, 0]
    heads.polar_margin = 0.0
    assert heads.vote(["a", "b", "c", "d"], np.zeros((4, 2)))[0][:, 0].tolist() == [1, 1, -1, 0]


def test_batch_equals_one_by_one():
    j = js.judge(3)
    texts = [t for t, _ in UNSEEN]
    batch = j.judge_batch([([], "", t) for t in texts])
    single = [j.judge([], "", t) for t in texts]
    assert [b.votes for b in batch] == [s.votes for s in single]
    assert [b.hint for b in batch] == [s.hint for s in single]


def test_m_votes_is_m_heads():
    from backend.judge import load_judge
    j5 = load_judge("embedding", m=5, featurizer=js.featurizer(), hints=False)
    r = j5.judge([], "", "Thank you so much, that was perfect!")
    assert len(r.votes) == 5 and r.reward == 1 and r.hint is None


def test_fitted_heads_are_cached_and_reused(tmp_path, monkeypatch):
    """Cold fit writes a pickle keyed by the data hash; a new judge loads it; a corrupt one is refitted."""
    from backend.judge import embedding
    from backend.judge.data import TRAIN_PATH
    from backend.judge.embedding import EmbeddingJudge, EmbeddingJudgeConfig
    small = tmp_path / "bank.jsonl"       # a small bank keeps the cold fit in this test quick
    lines = TRAIN_PATH.read_text().splitlines()
    small.write_text("\n".join(lines[::8]) + "\n")
    cfg = dict(m=3, cache_dir=tmp_path / "cache", train_path=small, hints=False)
    first = EmbeddingJudge(EmbeddingJudgeConfig(**cfg), featurizer=js.featurizer())
    files = sorted((tmp_path / "cache").glob("judge/embedding-*.pkl"))
    assert len(files) == 1
    t = "Nope, still wrong."
    refit = lambda *a, **k: (_ for _ in ()).throw(AssertionError("refit instead of cache load"))
    monkeypatch.setattr(embedding._Heads, "__init__", refit)
    again = EmbeddingJudge(EmbeddingJudgeConfig(**cfg), featurizer=js.featurizer())
    assert again.judge([], "", t).extra["probs"] == first.judge([], "", t).extra["probs"]
    monkeypatch.undo()
    files[0].write_bytes(b"not a pickle")          # corrupt cache: refit, never crash
    fresh = EmbeddingJudge(EmbeddingJudgeConfig(**cfg), featurizer=js.featurizer())
    assert fresh.judge([], "", t).extra["probs"] == first.judge([], "", t).extra["probs"]
    assert isinstance(pickle.loads(files[0].read_bytes()), embedding._Heads)
    small.write_text("\n".join(lines[1::8]) + "\n")   # other data -> other key -> a second file
    EmbeddingJudge(EmbeddingJudgeConfig(**cfg), featurizer=js.featurizer())
    assert len(list((tmp_path / "cache").glob("judge/embedding-*.pkl"))) == 2


def test_hints_come_from_the_judges_own_bank(tmp_path):
    """A judge fitted on another bank extracts hints with a model fitted on that bank too."""
    from backend.judge.data import TRAIN_PATH
    from backend.judge.embedding import EmbeddingJudge, EmbeddingJudgeConfig
    small = tmp_path / "bank.jsonl"
    small.write_text("\n".join(TRAIN_PATH.read_text().splitlines()[::8]) + "\n")
    j = EmbeddingJudge(EmbeddingJudgeConfig(m=1, cache_dir=tmp_path / "cache", train_path=small, tune_layers=0),
                       featurizer=js.featurizer())
    assert j.hinter.train_path == small
    assert len(list((tmp_path / "cache").glob("judge/hints-*.pkl"))) == 1


def test_config_mistakes_are_user_errors(tmp_path):
    from backend.judge import load_judge
    from backend.judge.embedding import EmbeddingJudgeConfig
    with pytest.raises(UserError):
        EmbeddingJudgeConfig(m=0)
    with pytest.raises(UserError):
        EmbeddingJudgeConfig(train_path=tmp_path / "missing.jsonl")
    with pytest.raises(UserError):
        load_judge("oracle")
    with pytest.raises(UserError):
        load_judge("llm", endpoint=None)


def test_explicit_feedback_overrides_and_teaches_that_user(tmp_path):
    """Thumbs are stored per user in SQLite; that user's heads are refitted with them."""
    from backend.judge import load_judge
    db = tmp_path / "feedback.db"
    j = load_judge("embedding", m=3, cache_dir=js.CACHE, featurizer=js.featurizer(), feedback_db=db)
    probe = "Grand job, that's class."        # dialect praise the bank does not contain
    before = j.judge([], "", probe, user="dee")
    for msg in ["Grand job.", "That's class, grand.", "Class, that's grand altogether.", "Grand stuff, class work."]:
        out = j.record_feedback("dee", [{"role": "user", "content": "q"}], "a reply", msg, +1)
        assert out.reward == 1 and out.judge_name == "explicit"
    j.record_feedback("dee", [], "another reply", None, -1)   # thumbs before any next message: stored only
    import sqlite_utils
    rows = list(sqlite_utils.Database(db)["feedback"].rows_where("user = ?", ["dee"]))
    assert len(rows) == 5 and {r["label"] for r in rows} == {1, -1}
    after = j.judge([], "", probe, user="dee")
    other = j.judge([], "", probe, user="someone-else")
    assert after.reward == 1
    assert other.votes == before.votes              # other users keep the shared heads
    p_before, p_after = before.extra["probs"][2], after.extra["probs"][2]
    assert p_after > p_before                       # the user's label moved the probability of +1
    with pytest.raises(UserError):
        j.record_feedback("dee", [], "r", "m", 0)


def _reuse_loaded_minilm(monkeypatch):
    """The commands build their own judge; hand them the already loaded MiniLM (saves ~3 s each)."""
    import backend.judge
    real = backend.judge.load_judge
    monkeypatch.setattr(backend.judge, "load_judge", lambda name="embedding", m=3, **kw:
                        real(name, m=m, featurizer=js.featurizer(), **kw))


def test_companion_judge_command(capsys, monkeypatch):
    from companion.cli import main
    _reuse_loaded_minilm(monkeypatch)
    assert main(["judge", "--reply", "def f(): ...", "--next", "I asked for Rust, not Python.", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["reward"] == -1 and len(out["votes"]) == 3 and "Rust" in out["hint"]
    assert main(["judge", "--next", "   "]) == 2
    assert "must not be empty" in capsys.readouterr().err


def test_python_m_backend_judge(tmp_path, capsys, monkeypatch):
    from backend.judge.__main__ import main
    _reuse_loaded_minilm(monkeypatch)
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"reply": "x", "next": "Brilliant, thanks a million!"}) + "\n\n"
                 + json.dumps({"reply": "x", "next": "Make it shorter, no bullet points."}) + "\n")
    assert main([str(f)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [d["reward"] for d in lines] == [1, -1]
    assert lines[1]["hint"] and "shorter" in lines[1]["hint"].lower()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"reply": "x"}\n')
    assert main([str(bad)]) == 2
    assert "needs a \"next\" string" in capsys.readouterr().err
