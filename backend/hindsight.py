"""Hindsight prompts for praised rewrites: which earlier prompt a praised reply was really the answer to.

When the person criticises a reply and the assistant tries again in the same conversation, a
praised second attempt is a reply the person wanted *for the first prompt*: the policy should have
written it before being told. The served sample trains it on its own prompt (which holds the
criticised attempt and the correction); ``TrainerConfig.w_hindsight`` also trains it on the prompt
of the criticised turn it replaced, so the criticised reply (-1) and the praised one (+1) meet on
the same prompt, as a pair.

Contract of :func:`hindsight_origin`:
- ``turn`` is a wire turn (``messages``, ``index``) the judge rewarded +1; ``earlier`` maps
  ``index -> (payload, reward)`` for the earlier turns of the same session (reward None while
  unjudged).
- It returns the payload of the *first* turn of the chain of criticised attempts that ``turn``
  continues, or None. A link of the chain holds only when the earlier turn's reward is -1 *and*
  the later turn's messages are exactly the earlier turn's messages plus that turn's reply and the
  person's next message (so the later prompt really is "the criticised attempt, then what the
  person said about it").
- It never looks past a turn that was not criticised: a praised reply after an unjudged or a
  praised turn has no hindsight prompt.

What it cannot tell: whether the person's next message asked for a rewrite or asked something new
("too long. And what is 2+2?"). In the second case the praised reply answers another question, and
training it on the first prompt is wrong; that is why ``w_hindsight`` is an option, measured on
the persona replay (docs/replay.md, Session 16), where a criticised session continues only with a
rewrite request.
"""

from __future__ import annotations


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.get("role") == y.get("role") and str(x.get("content", "")) == str(y.get("content", "")) for x, y in zip(a, b))


def continues(later: dict, earlier: dict) -> bool:
    """True when ``later``'s prompt is ``earlier``'s prompt + its reply + the person's next message."""
    nxt = earlier.get("next_message")
    if not isinstance(nxt, str) or earlier.get("reply") is None:
        return False
    want = list(earlier.get("messages") or []) + [{"role": "assistant", "content": earlier["reply"]},
                                                  {"role": "user", "content": nxt}]
    return _same(list(later.get("messages") or []), want)


def hindsight_origin(turn: dict, earlier: dict[int, tuple[dict, int | None]]) -> dict | None:
    """The payload of the first criticised attempt ``turn`` rewrites, or None (see the module docstring)."""
    origin, cur = None, turn
    idx = cur.get("index")
    while isinstance(idx, int) and idx - 1 in earlier:
        prev, reward = earlier[idx - 1]
        if reward != -1 or not continues(cur, prev):
            break
        origin, cur, idx = prev, prev, idx - 1
    return origin
