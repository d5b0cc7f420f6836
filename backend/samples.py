"""Training samples: a judged turn -> token ids, reply mask inputs, reward and OPD teacher prompt.

Contract:
- :func:`build_sample` turns one turn dict (wire format in DESIGN.md / the team's
  interface: ``prompt_ids``, ``token_ids``, ``logprobs``, ``messages``,
  ``policy_version`` ...) plus the judge's reward and hint into a :class:`Sample`,
  or returns None when the turn carries no signal (reward 0 and no hint) or has
  an empty reply.
- The reply tokens are the *exact sampled ids* from serving, never a
  re-tokenisation of the reply text (re-tokenising shifts log-probs).
- The OPD teacher prompt is the same prompt with the hint added where
  ``cfg.hint_placement`` says: appended to the last user message (``"user"``,
  ``cfg.hint_template``) or to the system message (``"system"``,
  ``SYSTEM_HINT_TEMPLATE``; a system message is added when there is none), rendered
  with the tokenizer's chat template and the generation prompt; the teacher scores
  the same reply ids.
- Over-long prompts keep their *last* ``max_prompt_tokens`` ids; over-long
  replies keep their first ``max_response_tokens`` (log-probs cut alike).
- ``quoted_positions``: when the hint quotes words ('crucial', "in summary"; straight or
  curly quotes, 2-40 characters, not an apostrophe inside a word) that the reply contains
  (case-insensitively, whole words), the index of the first reply token of every such
  occurrence, ascending; None when nothing quoted is in the reply. The trainer's
  ``w_quoted`` term pushes exactly these tokens down.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from companion.errors import UserError

HINT_TEMPLATE = "\n\n[user's hint / instruction]\n{hint}"
# The hint as a standing instruction in the system message (hint_placement "system"). Measured with
# scripts/hint_adherence.py: the hinted base model meets every student preference in 0.288 of its
# replies this way against 0.197 with HINT_TEMPLATE, yet the student replay learned no more from it
# (docs/replay.md, Session 21), so "user" stays the default.
SYSTEM_HINT_TEMPLATE = "\n\nThe user's instruction for every reply: {hint}"
HINT_PLACEMENTS = ("user", "system")
# A quoted word or phrase in a hint: 'x', "x", ‘x’ or “x”, opened where no word character
# precedes it, so the apostrophes of "don't" or "kid's" never open a quote.
QUOTED = re.compile(r"""(?<!\w)(?:'([^'\n]{2,40})'|"([^"\n]{2,40})"|‘([^’\n]{2,40})’|“([^”\n]{2,40})”)(?!\w)""")


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class SampleConfig:
    max_prompt_tokens: int = _help("Longest prompt kept (oldest tokens dropped first).", default=1536)
    max_response_tokens: int = _help("Longest reply trained on (tail dropped).", default=512)
    hint_template: str = _help("How a hint is appended to the last user message for the OPD teacher.", default=HINT_TEMPLATE)
    hint_placement: str = _help("Where the OPD teacher sees the hint: 'user' (appended to the last user message "
                                "with hint_template) or 'system' (appended to the system message).", default="user")

    def __post_init__(self) -> None:
        if self.max_prompt_tokens < 1 or self.max_response_tokens < 1:
            raise UserError("max_prompt_tokens and max_response_tokens must be at least 1.")
        if "{hint}" not in self.hint_template:
            raise UserError("hint_template must contain {hint}.")
        if self.hint_placement not in HINT_PLACEMENTS:
            raise UserError(f"hint_placement must be one of {', '.join(HINT_PLACEMENTS)}, not {self.hint_placement!r}.")


@dataclass
class Sample:
    turn_id: str
    user: str
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float] | None
    reward: int
    hint: str | None
    teacher_prompt_ids: list[int] | None
    policy_version: int
    # For a praised rewrite: the prompt of the criticised attempt it replaced (backend.hindsight), else None.
    hindsight_prompt_ids: list[int] | None = None
    # Reply token indices where a word the hint quotes starts (see quoted_positions), else None.
    quoted_positions: list[int] | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "Sample":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def hinted_messages(messages: list[dict], hint: str, template: str = HINT_TEMPLATE, placement: str = "user") -> list[dict]:
    """A copy of ``messages`` with the hint appended to the last user message (``placement`` "user",
    with ``template``) or to the system message (``placement`` "system", with SYSTEM_HINT_TEMPLATE;
    one is inserted first when the conversation has none)."""
    out = copy.deepcopy(list(messages))
    if placement == "system":
        if not out or out[0].get("role") != "system":
            out.insert(0, {"role": "system", "content": ""})
        out[0]["content"] = (str(out[0].get("content", "")) + SYSTEM_HINT_TEMPLATE.format(hint=hint)).strip()
        return out
    if placement != "user":
        raise ValueError(f"unknown hint placement {placement!r}")
    for m in reversed(out):
        if m.get("role") == "user":
            m["content"] = str(m.get("content", "")) + template.format(hint=hint)
            return out
    raise ValueError("no user message to attach the hint to")


def quoted_phrases(hint: str) -> list[str]:
    """The words or phrases a hint quotes, in order, whitespace-normalised, without repeats."""
    out: list[str] = []
    for m in QUOTED.finditer(hint):
        phrase = " ".join(next(g for g in m.groups() if g is not None).split()).strip(" .,;:!?")
        if len(phrase) >= 2 and phrase.lower() not in (p.lower() for p in out):
            out.append(phrase)
    return out


def token_spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token in the decoded reply, decoding prefix by prefix (exact across
    BPE merges and multi-byte characters, which a per-token decode is not); replies are short."""
    spans, pos = [], 0
    for k in range(len(ids)):
        end = len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True))
        spans.append((pos, end))
        pos = max(pos, end)
    return spans


def quoted_positions(tokenizer, response_ids: list[int], phrases: list[str]) -> list[int] | None:
    """First reply token of every whole-word, case-insensitive occurrence of a phrase; None if none."""
    if not phrases or not response_ids:
        return None
    text = tokenizer.decode(response_ids, skip_special_tokens=True)
    hits = [(m.start(), m.end()) for phrase in phrases
            for m in re.finditer(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in phrase.split()) + r"(?!\w)",
                                 text, re.IGNORECASE)]
    if not hits:
        return None
    spans = token_spans(tokenizer, response_ids)
    found = {next((k for k, (a, b) in enumerate(spans) if a < e and b > s), None) for s, e in hits}
    return sorted(k for k in found if k is not None) or None


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(enc["input_ids"])


def build_sample(turn: dict, reward: int, hint: str | None, tokenizer, cfg: SampleConfig | None = None):
    """One judged turn -> :class:`Sample`, or None when it has no training signal."""
    cfg = cfg if isinstance(cfg, SampleConfig) else SampleConfig()
    if reward not in (-1, 0, 1):
        raise ValueError(f"reward must be -1, 0 or 1, not {reward!r}")
    hint = hint.strip() if isinstance(hint, str) and hint.strip() else None
    if reward == 0 and hint is None:
        return None
    response = [int(t) for t in (turn.get("token_ids") or [])][: cfg.max_response_tokens]
    if not response:
        return None
    prompt = turn.get("prompt_ids")
    prompt = [int(t) for t in prompt] if prompt else chat_ids(tokenizer, turn["messages"])
    prompt = prompt[-cfg.max_prompt_tokens :]
    lps = turn.get("logprobs")
    lps = [float(x) for x in lps][: len(response)] if lps else None
    if lps is not None and len(lps) != len(response):
        lps = None  # a mismatched record cannot be compared token by token
    teacher = quoted = None
    if hint is not None:
        teacher = chat_ids(tokenizer, hinted_messages(turn["messages"], hint, cfg.hint_template, cfg.hint_placement))
        teacher = teacher[-cfg.max_prompt_tokens :]
        if reward <= 0:  # words quoted in praise are not words to avoid
            quoted = quoted_positions(tokenizer, response, quoted_phrases(hint))
    return Sample(
        turn_id=str(turn.get("turn_id", "")),
        user=str(turn.get("client_id", "")),
        prompt_ids=prompt,
        response_ids=response,
        rollout_logprobs=lps,
        reward=int(reward),
        hint=hint,
        teacher_prompt_ids=teacher,
        policy_version=int(turn.get("policy_version", 0)),
        quoted_positions=quoted,
    )
