"""The backend's train stage when updates fail: counted in a row, reported in status, cleared by a success."""

from __future__ import annotations

import pytest
import torch

from backend.delta import Delta
from backend.loops import Pipeline, PipelineConfig
from backend.samples import Sample
from backend.store import Store


SAMPLE = Sample("t0", "u", [1, 2], [3], None, -1, None, None, 0)  # the judged turn of the store below


def _pipeline_with_one_judged_turn(tmp_path) -> tuple[Store, Pipeline]:
    store = Store(tmp_path / "backend.db")
    store.add_turn("u", {"turn_id": "t0", "client_id": "u", "session_id": "s1", "index": 0, "prompt_ids": [1, 2],
                         "messages": [{"role": "user", "content": "hi"}], "reply": "yo", "next_message": "meh"})
    store.set_judgment("t0", -1, [-1, -1, -1], None, "test", 0.0)
    stages = type("Stages", (), {"fingerprint": None})()
    return store, Pipeline(store, stages=stages, cfg=PipelineConfig(), data_dir=tmp_path, publish=lambda *a: None)


class _Trainer:
    """A trainer whose every update succeeds (the tests override what they exercise)."""

    version = 0

    def update(self, samples):
        self.version += 1
        return {"loss": 0.1}

    def export_delta(self):
        return Delta(self.version, self.version - 1, "full", {"w": torch.zeros(2)}, {})


def test_updates_that_keep_failing_are_counted_and_shown_until_one_succeeds(tmp_path):
    # A failed update is retried; the backend reports how many failed in a row and the last error,
    # which the chat shows and which stops a replay early (it used to wait out its 600 s timeout).
    store, pipe = _pipeline_with_one_judged_turn(tmp_path)

    class Trainer(_Trainer):
        fail = True

        def update(self, samples):
            if self.fail:
                raise RuntimeError("one of the variables needed for gradient computation\nwas modified")
            return super().update(samples)

    tr = pipe._trainers["u"] = Trainer()
    for n in (1, 2):
        with pytest.raises(RuntimeError):
            pipe._train("u", [SAMPLE])
        st = pipe.stats()
        assert st["train_failures"] == {"u": n}
        assert st["train_error"] == {"u": "RuntimeError: one of the variables needed for gradient computation"}
    assert store.get_turn("t0")["stage"] == "judged"  # back to be rebuilt and retried
    tr.fail = False
    pipe._train("u", [SAMPLE])
    st = pipe.stats()
    assert st["train_failures"] == {} and st["train_error"] == {} and st["policy_versions"]["u"] == 1


def test_an_idle_train_stage_prepares_the_next_update_and_leaves_a_failing_preparation_alone(tmp_path):
    # While no batch is ready the train thread gives the trainers their idle-time work (Trainer.prepare:
    # the loop term's greedy replies) with the samples waiting for their next batch; one that raised is
    # not called again until its next update.
    import threading
    import time

    _, pipe = _pipeline_with_one_judged_turn(tmp_path)

    class Trainer(_Trainer):
        def __init__(self):
            self.results = [True, RuntimeError("no memory"), True, False]
            self.calls, self.pending = 0, []

        def prepare(self, pending):
            self.calls += 1
            self.pending.append([s.turn_id for s in pending])
            r = self.results.pop(0) if self.results else False
            if isinstance(r, Exception):
                raise r
            return r

    tr = pipe._trainers["u"] = Trainer()
    waiting = [Sample(**{**SAMPLE.to_dict(), "turn_id": f"w{i}"}) for i in range(PipelineConfig().batch_size + 1)]
    pipe._buffers["u"] = [(0.0, s) for s in waiting]
    assert pipe._prepare_trainers() is True
    assert tr.pending == [[s.turn_id for s in waiting[:-1]]]  # the next batch only
    pipe._buffers["u"] = []
    assert pipe._prepare_trainers() is False and tr.calls == 2  # raised: logged, not fatal
    assert pipe._prepare_trainers() is False and tr.calls == 2  # left alone until the next update
    pipe._train("u", [SAMPLE])
    # the train loop itself calls it when idle
    loop = threading.Thread(target=pipe._train_loop, daemon=True)
    loop.start()
    deadline = time.time() + 10
    while tr.calls < 4 and time.time() < deadline:
        time.sleep(0.05)
    pipe._stop.set()
    loop.join(timeout=5)
    assert tr.calls >= 4 and not loop.is_alive()


def test_an_idle_train_stage_makes_a_new_users_trainer_before_the_first_batch_is_full(tmp_path):
    # Loading the model is the first batch's longest wait; the idle train thread does it as soon as the
    # user's first sample waits, then that trainer's own preparation. A failure is logged, not retried.
    _, pipe = _pipeline_with_one_judged_turn(tmp_path)
    made = []

    class Trainer(_Trainer):
        def prepare(self, pending):
            return False

    def make(user, ckpt):
        made.append(user)
        if user == "broken":
            raise RuntimeError("no memory")
        return Trainer()

    pipe.stages.trainer = make
    assert pipe._prepare_trainers() is False and made == []  # nobody waits
    pipe._buffers["u"] = [(0.0, SAMPLE)]
    assert pipe._prepare_trainers() is True and made == ["u"] and isinstance(pipe._trainers["u"], Trainer)
    assert pipe._prepare_trainers() is False and made == ["u"]  # made once
    pipe._buffers["broken"] = [(0.0, Sample(**{**SAMPLE.to_dict(), "user": "broken"}))]
    assert pipe._prepare_trainers() is False and pipe._prepare_trainers() is False and made == ["u", "broken"]
