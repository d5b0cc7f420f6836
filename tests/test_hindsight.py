"""Hindsight prompts for praised rewrites: the chain rule, the backend's lookup in its store, the trainer's pairs."""

from __future__ import annotations

import pytest
import torch

from backend.hindsight import continues, hindsight_origin
from backend.loops import Pipeline, PipelineConfig
from backend.samples import Sample
from backend.store import Store

SYSTEM = {"role": "system", "content": "You are helpful."}


def turn(index: int, messages: list[dict], reply: str, next_message: str | None, tid: str | None = None) -> dict:
    return {"turn_id": tid or f"t{index}", "client_id": "u", "session_id": "s1", "index": index,
            "messages": messages, "reply": reply, "next_message": next_message, "prompt_ids": [index, 7, 7]}


def rewrite_of(prev: dict, reply: str, next_message: str | None) -> dict:
    msgs = prev["messages"] + [{"role": "assistant", "content": prev["reply"]},
                               {"role": "user", "content": prev["next_message"]}]
    return turn(prev["index"] + 1, msgs, reply, next_message)


def session() -> list[dict]:
    """Asked, criticised twice with a rewrite request, then praised."""
    t0 = turn(0, [SYSTEM, {"role": "user", "content": "What is a noun?"}], "A noun is a fundamental part...",
              "Too long. Try again?")
    t1 = rewrite_of(t0, "A noun is a multifaceted word...", "Plainer words please. Again?")
    t2 = rewrite_of(t1, "A noun names a thing, like dog.", "Thanks, that's it.")
    return [t0, t1, t2]


def test_a_praised_rewrite_goes_back_to_the_first_criticised_attempt():
    t0, t1, t2 = session()
    assert continues(t2, t1) and continues(t1, t0) and not continues(t2, t0)
    assert hindsight_origin(t2, {0: (t0, -1), 1: (t1, -1)}) is t0
    # the chain stops at a turn that was not criticised (or not judged yet) ...
    assert hindsight_origin(t2, {0: (t0, 1), 1: (t1, -1)}) is t1
    assert hindsight_origin(t2, {0: (t0, -1), 1: (t1, None)}) is None
    assert hindsight_origin(t2, {0: (t0, -1), 1: (t1, 0)}) is None
    # ... and where the later prompt is not "that attempt, then what the person said about it"
    edited = dict(t1, next_message="Something else entirely.")
    assert hindsight_origin(t2, {0: (t0, -1), 1: (edited, -1)}) is None
    assert hindsight_origin(t0, {}) is None  # the first turn of a session rewrites nothing


def test_the_backend_attaches_the_first_attempts_prompt_to_a_praised_rewrite(tmp_path):
    store = Store(tmp_path / "backend.db")
    t0, t1, t2 = session()
    for t, reward in ((t0, -1), (t1, -1), (t2, 1)):
        store.add_turn("u", t)
        store.set_judgment(t["turn_id"], reward, [reward] * 3, None, "test", 0.0)
    other = dict(turn(0, t0["messages"], t0["reply"], t0["next_message"], tid="x0"), session_id="s2")
    store.add_turn("u", other)  # same text, another session: never looked at
    pipe = Pipeline(store, stages=None, cfg=PipelineConfig(), data_dir=tmp_path, publish=lambda *a: None)
    built: list[dict] = []

    def build(payload, reward, hint):
        built.append(payload)
        return Sample(payload["turn_id"], "u", list(payload["prompt_ids"]), [5, 6], None, reward, hint, None, 0)

    praised = build(t2, 1, None)
    pipe._attach_hindsight(praised, store.get_turn("t2"), build)
    assert praised.hindsight_prompt_ids == t0["prompt_ids"] and built[-1]["turn_id"] == "t0"
    first = build(t0, -1, None)
    pipe._attach_hindsight(first, store.get_turn("t0"), build)  # index 0: nothing before it
    assert first.hindsight_prompt_ids is None
    # a sample type without the field (the tiny stages') is left alone
    bare = type("Bare", (), {})()
    pipe._attach_hindsight(bare, store.get_turn("t2"), build)
    assert not hasattr(bare, "hindsight_prompt_ids")
    assert Sample.from_dict({k: v for k, v in praised.to_dict().items() if k != "hindsight_prompt_ids"}) \
        .hindsight_prompt_ids is None  # samples written before the field still load


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_the_trainer_trains_a_praised_rewrite_on_the_first_prompt_only_when_asked(tiny_model_dir):
    from backend.trainer import Trainer, TrainerConfig
    from backend.trainer.tp_check import fixed_samples

    torch.set_num_threads(1)
    quiet = dict(repetition_guard=False, kl_coef=0.0, entropy_floor=0.0, lora_rank=4, epochs=1, replay_praised=0, w_loops=0.0,
                 lr=3e-3, w_rl=0.0, w_opd=0.0)  # only the hindsight pair can move the policy
    tr = Trainer(TrainerConfig(**quiet, w_hindsight=1.0), model_path=tiny_model_dir)
    praised, _ = fixed_samples(tr.tokenizer)
    first_prompt = tr.tokenizer.apply_chat_template([{"role": "user", "content": "Say it plainly."}],
                                                    add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
    rewrite = Sample(**{**praised.to_dict(), "reward": 1, "hindsight_prompt_ids": list(first_prompt)})
    on_first = Sample(**{**rewrite.to_dict(), "prompt_ids": list(first_prompt), "hindsight_prompt_ids": None})
    before = tr.score([on_first])[0]
    rep = tr.update([rewrite])
    assert rep.n_hindsight == 1 and rep.n_samples == 1 and rep.n_teacher_replies == 0 and rep.n_replayed == 0
    assert rep.n_tokens == 2 * len(rewrite.response_ids)
    assert tr.score([on_first])[0] > before + 0.05  # the reply became likelier on the first prompt
    assert tr.n_rewards == 1  # the pair did not move the reward baseline
    # off by default, and never for a criticised sample
    off = Trainer(TrainerConfig(**quiet), model_path=tiny_model_dir)
    assert TrainerConfig().w_hindsight == 0.0 and off.update([rewrite]).n_hindsight == 0
    criticised = Sample(**{**rewrite.to_dict(), "reward": -1})
    assert tr.hindsight_samples([criticised]) == []
    with pytest.raises(Exception, match="w_hindsight"):
        TrainerConfig(w_hindsight=-1)

