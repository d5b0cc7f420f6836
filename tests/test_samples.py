"""build_sample: signal filtering, exact reply ids, hinted teacher prompt, truncation."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from backend.samples import HINT_TEMPLATE, SYSTEM_HINT_TEMPLATE, SampleConfig, build_sample, hinted_messages, quoted_phrases


@pytest.fixture(scope="module")
def tok(real_model_dir):
    return AutoTokenizer.from_pretrained(str(real_model_dir))


def _turn(tok, reply_ids=(100, 200, 300, 2)):
    msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a fact."}]
    p = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return {"turn_id": "t1", "client_id": "alice", "messages": msgs, "prompt_ids": list(p), "token_ids": list(reply_ids),
            "logprobs": [-0.5] * len(reply_ids), "policy_version": 3, "next_message": "ok", "feedback": None}


def test_no_signal_turns_are_skipped(tok):
    assert build_sample(_turn(tok), 0, None, tok) is None
    assert build_sample(_turn(tok), 0, "   ", tok) is None
    assert build_sample(_turn(tok, reply_ids=()), 1, None, tok) is None


def test_sample_keeps_the_exact_sampled_ids_and_metadata(tok):
    turn = _turn(tok)
    s = build_sample(turn, -1, None, tok)
    assert s.response_ids == [100, 200, 300, 2]
    assert s.prompt_ids == turn["prompt_ids"]
    assert s.rollout_logprobs == [-0.5] * 4
    assert (s.reward, s.hint, s.teacher_prompt_ids, s.policy_version, s.user) == (-1, None, None, 3, "alice")


def test_hint_goes_to_the_last_user_message_of_the_teacher_prompt(tok):
    turn = _turn(tok)
    s = build_sample(turn, 0, "Keep it under ten words.", tok)
    assert s is not None and s.reward == 0
    text = tok.decode(s.teacher_prompt_ids)
    assert text.count("[user's hint / instruction]") == 1
    assert "Tell me a fact." + HINT_TEMPLATE.format(hint="Keep it under ten words.") in text
    assert "Hi there\n\n[user's hint" not in text  # earlier user turns untouched
    assert text.rstrip().endswith("assistant")  # generation prompt, reply ids follow
    assert turn["messages"][-1]["content"] == "Tell me a fact."  # the turn itself is not mutated


def test_system_placement_puts_the_hint_in_the_system_message_only(tok):
    turn = _turn(tok)
    s = build_sample(turn, -1, "Keep it under ten words.", tok, SampleConfig(hint_placement="system"))
    text = tok.decode(s.teacher_prompt_ids)
    assert "You are a helpful assistant." + SYSTEM_HINT_TEMPLATE.format(hint="Keep it under ten words.") in text
    assert "[user's hint" not in text and text.count("Keep it under ten words.") == 1
    assert text.index("Keep it under ten words.") < text.index("Hi there")  # before the conversation
    assert s.prompt_ids == turn["prompt_ids"]  # the policy's prompt is untouched
    assert turn["messages"][0]["content"] == "You are a helpful assistant."  # the turn is not mutated
    # A conversation without a system message gets one holding only the hint.
    out = hinted_messages([{"role": "user", "content": "Hi"}], "Be brief, please.", placement="system")
    assert out == [{"role": "system", "content": "The user's instruction for every reply: Be brief, please."},
                   {"role": "user", "content": "Hi"}]
    from companion.errors import UserError

    with pytest.raises(UserError, match="hint_placement"):
        SampleConfig(hint_placement="middle")


def test_the_backend_sample_stage_takes_the_trainers_hint_placement(tok, real_model_dir):
    from backend.stages import default_stages

    hint = "Keep it under ten words."
    for overrides, system_has_hint in (({"hint_placement": "system"}, True), ({}, False)):
        build = default_stages(real_model_dir, trainer_overrides=overrides).sample_builder()
        text = tok.decode(build(_turn(tok), -1, hint).teacher_prompt_ids)
        assert (SYSTEM_HINT_TEMPLATE.format(hint=hint) in text) is system_has_hint
        assert ("[user's hint / instruction]" in text) is not system_has_hint


def test_truncation_and_bad_input(tok):
    cfg = SampleConfig(max_prompt_tokens=5, max_response_tokens=2)
    s = build_sample(_turn(tok), 1, None, tok, cfg)
    assert len(s.prompt_ids) == 5 and s.prompt_ids == _turn(tok)["prompt_ids"][-5:]
    assert s.response_ids == [100, 200] and s.rollout_logprobs == [-0.5, -0.5]
    with pytest.raises(ValueError):
        build_sample(_turn(tok), 2, None, tok)
    with pytest.raises(ValueError):
        hinted_messages([{"role": "system", "content": "x"}], "hint")
    from companion.errors import UserError

    with pytest.raises(UserError):
        SampleConfig(hint_template="no placeholder")


def test_quoted_words_of_a_complaint_mark_the_reply_tokens_where_they_start(tok):
    assert quoted_phrases("Don't start with 'Sure' or 'Certainly', my kid's teacher says “in  summary” is AI.") == \
        ["Sure", "Certainly", "in summary"]
    assert quoted_phrases("it's fine, don't 'x' and 'SURE' 'sure'") == ["SURE"]  # apostrophes open nothing; 1 char is no word
    reply = "Sure! Gravity is a fundamental force. In\nsummary, it is Fundamental, not fundamentally."
    ids = tok(reply, add_special_tokens=False)["input_ids"] + [2]
    s = build_sample(_turn(tok, ids), -1, "Stop using words like 'fundamental' and 'in summary'.", tok)
    assert [tok.decode([ids[t]]) for t in s.quoted_positions] == [" fundamental", " In", " Fundamental"]
    assert build_sample(_turn(tok, ids), -1, "Shorter please.", tok).quoted_positions is None
    assert build_sample(_turn(tok, ids), -1, "Stop saying 'crucial'.", tok).quoted_positions is None  # not in the reply
    assert build_sample(_turn(tok, ids), 1, "I loved 'fundamental force'.", tok).quoted_positions is None  # praise
