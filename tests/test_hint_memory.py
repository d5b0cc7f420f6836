"""Hint memory of the OPD teacher (TrainerConfig.hint_memory): the store's recent hints, the backend's rewrite
of each sample's teacher prompt, and that the policy's own prompt never changes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from backend.loops import Pipeline, PipelineConfig, Stages
from backend.samples import Sample, SampleConfig, build_sample
from backend.store import Store

SYSTEM = {"role": "system", "content": "You are helpful."}


def wire(tid: str, question: str) -> dict:
    return {"turn_id": tid, "client_id": "u", "session_id": tid, "index": 0,
            "messages": [SYSTEM, {"role": "user", "content": question}], "reply": "A reply.",
            "token_ids": [11, 12, 13], "logprobs": [-0.1, -0.2, -0.3], "policy_version": 0}


def judged_store(tmp_path, judgments) -> Store:
    """judgments: (turn_id, reward, hint) in the order the judge gave them."""
    store = Store(tmp_path / "backend.db")
    for i, (tid, reward, hint) in enumerate(judgments):
        store.add_turn("u", wire(tid, f"Question {tid}?"))
        store.set_judgment(tid, reward, [reward] * 3, hint, "test", 100.0 + i)
    return store


def test_recent_hints_are_the_newest_distinct_ones_oldest_first(tmp_path):
    store = judged_store(tmp_path, [("a", -1, "Make it shorter."), ("b", 1, None), ("c", -1, "No filler words."),
                                    ("d", -1, "make it   SHORTER."), ("e", -1, "Answer the question.")])
    store.add_turn("other", wire("z", "Hi?"))
    store.set_judgment("z", -1, [-1] * 3, "Another person's hint.", "test", 200.0)
    # "make it SHORTER." repeats "Make it shorter." (case and spaces ignored): the newer spelling is kept
    assert store.recent_hints("u", 5) == ["No filler words.", "make it   SHORTER.", "Answer the question."]
    assert store.recent_hints("u", 2) == ["make it   SHORTER.", "Answer the question."]
    assert store.recent_hints("nobody", 3) == []


def recording_builder(calls: list):
    def build(payload, reward, hint):
        calls.append((payload["turn_id"], reward, hint))
        return Sample(payload["turn_id"], "u", [1, 2, 3], [11, 12, 13], None, reward, hint,
                      None if hint is None else [9, len(hint)], 0)
    return build


class RecordingTrainer:
    """Stands in for the trainer only to see what the backend hands to ``update`` (then fails it)."""

    def __init__(self, hint_memory: int, scope: str) -> None:
        self.cfg = SimpleNamespace(hint_memory=hint_memory, hint_memory_scope=scope)
        self.version, self.seen = 0, None

    def update(self, samples):
        self.seen = [(s.turn_id, s.hint, s.teacher_prompt_ids, s.prompt_ids) for s in samples]
        raise RuntimeError("recorded")


@pytest.mark.parametrize("memory,scope", [(0, "all"), (2, "all"), (2, "hinted")])
def test_the_backend_gives_the_samples_of_an_update_the_newest_hints_only_when_asked(tmp_path, memory, scope):
    store = judged_store(tmp_path, [("a", -1, "Make it shorter."), ("b", -1, "No filler words."),
                                    ("c", 1, None), ("d", -1, "Answer the question.")])
    calls: list = []
    stages = Stages(judge=None, sample_builder=lambda: recording_builder(calls), trainer=None)
    pipe = Pipeline(store, stages=stages, cfg=PipelineConfig(), data_dir=tmp_path, publish=lambda *a: None)
    build = recording_builder([])
    batch = [build(store.get_turn(t)["payload"], r, h) for t, r, h in
             (("a", -1, "Make it shorter."), ("c", 1, None), ("d", -1, "Answer the question."))]
    tr = pipe._trainers["u"] = RecordingTrainer(memory, scope)
    with pytest.raises(RuntimeError, match="recorded"):
        pipe._train("u", batch)
    if memory == 0:
        assert calls == [] and [h for _, h, _, _ in tr.seen] == ["Make it shorter.", None, "Answer the question."]
        return
    joined = "No filler words. Answer the question."  # the two newest, oldest first: "b" is not in the batch
    own_a = "Make it shorter. Answer the question."  # "a"'s own hint fell out of the two newest: it keeps it
    assert all(p == [1, 2, 3] for _, _, _, p in tr.seen)  # the policy's prompt is untouched
    if scope == "hinted":  # the praised "c" keeps no teacher
        assert [(t, h, tp) for t, h, tp, _ in tr.seen] == [("a", own_a, [9, len(own_a)]), ("c", None, None),
                                                          ("d", joined, [9, len(joined)])]
        assert [(t, r) for t, r, _ in calls] == [("a", -1), ("d", -1)]
        return
    assert [(t, h) for t, h, _, _ in tr.seen] == [("a", own_a), ("c", joined), ("d", joined)]
    assert [tp for _, _, tp, _ in tr.seen][1:] == [[9, len(joined)]] * 2  # the praised "c" has a teacher now
    assert [(t, r) for t, r, _ in calls] == [("a", -1), ("c", 1), ("d", -1)]  # rebuilt from the stored turns


def test_the_joined_hints_reach_the_teacher_prompt_and_never_the_policys(tmp_path, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    store = judged_store(tmp_path, [("a", -1, "Make it shorter."), ("b", 1, None)])
    stages = Stages(judge=None, trainer=None,
                    sample_builder=lambda: lambda t, r, h: build_sample(t, r, h, tok, SampleConfig()))
    pipe = Pipeline(store, stages=stages, cfg=PipelineConfig(), data_dir=tmp_path, publish=lambda *a: None)
    praised = build_sample(store.get_turn("b")["payload"], 1, None, tok)
    assert praised.teacher_prompt_ids is None
    policy_prompt = list(praised.prompt_ids)
    pipe._apply_hint_memory("u", [praised], 4, only_hinted=False)
    assert praised.hint == "Make it shorter." and praised.prompt_ids == policy_prompt
    teacher_text = tok.decode(praised.teacher_prompt_ids)
    assert "Question b?" in teacher_text and "Make it shorter." in teacher_text
    assert "Make it shorter." not in tok.decode(praised.prompt_ids)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_samples_own_hint_is_kept_whatever_the_memory_size(n):
    from backend.loops import _with_own_hint

    newest = ["No filler words.", "Answer the question.", "No lists."][-n:]
    assert _with_own_hint(newest, "make it  SHORTER.", n)[0] == "make it  SHORTER."  # pushed out: it comes back first
    assert _with_own_hint(newest, "make it  SHORTER.", n)[1:] == newest[1:]  # then the newest n - 1
    assert len(_with_own_hint(newest, "make it  SHORTER.", n)) == n
    assert _with_own_hint(newest, "no LISTS.", n) == newest  # still among them: unchanged
    assert _with_own_hint(newest, None, n) == newest  # a sample without a hint (scope 'all')
