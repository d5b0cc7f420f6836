"""The LLM judge: the paper's PRM prompt against any OpenAI-compatible chat endpoint.

Contract: ``LLMJudge(endpoint, model, m).judge(context, reply, next_message)``
sends m sampled requests to ``<endpoint>/chat/completions`` (SGLang, vLLM or a
hosted API; ``endpoint`` ends in ``/v1``), takes the last ``\\boxed{...}``
value of each completion as a vote in {-1,0,1}, ignores unparseable votes and
returns their majority (tie or no valid vote -> 0). With hints on, a turn not
judged +1 also goes through the paper's hint prompt (``backend.hints``).

Transport: the standard library (urllib) and a thread per vote; no SDK needed.
An API key is read from the environment variable named by ``api_key_env``.
Network failures raise ``UserError`` with one sentence (the backend turns it
into a 0 judgment and retries later; it must never crash the loop).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from backend.judge.base import Item, Judge, Judgment, majority_vote
from companion.errors import UserError

JUDGE_SYSTEM_PROMPT = (
    "You are a process reward model (PRM) evaluating an AI assistant.\n"
    "You will see the user's request, the assistant's response at turn t, and the next state: "
    "the user's next message at turn t+1. Judge the response at turn t in the light of the next state.\n"
    "Scoring:\n"
    "- \\boxed{-1}: the next state asks for a redo, corrects the response, rephrases the same request, "
    "complains (including sarcasm), or reports an error the response caused.\n"
    "- \\boxed{1}: the next state shows progress: thanks, praise, acceptance, or moving on building on the response.\n"
    "- \\boxed{0}: ambiguous, or an unrelated new request that says nothing about the response.\n"
    "Reason briefly (one or two sentences), then end with your score as \\boxed{1}, \\boxed{0} or \\boxed{-1}."
)

_BOXED = re.compile(r"\\boxed\{\s*([+-]?\d+)\s*\}")


def parse_boxed(text: str, allowed: tuple[int, ...] = (-1, 0, 1)) -> int | None:
    """The last ``\\boxed{n}`` in text if n is allowed, else None (an unparseable vote)."""
    found = _BOXED.findall(text or "")
    if not found:
        return None
    v = int(found[-1])
    return v if v in allowed else None


def turn_prompt(system: str, context: list[dict], reply: str, next_message: str, question: str) -> list[dict]:
    """The paper's prompt layout shared by the judge and the hint extractor: the last user
    request, the reply, the next state, then ``question``."""
    last_user = next((m["content"] for m in reversed(context or []) if m.get("role") == "user"), "")
    user = (f"User request at turn t:\n{last_user}\n\nAssistant response at turn t:\n{reply}\n\n"
            f"Next state (user's next message at turn t+1):\n{next_message}\n\n{question}")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def judge_messages(context: list[dict], reply: str, next_message: str) -> list[dict]:
    return turn_prompt(JUDGE_SYSTEM_PROMPT, context, reply, next_message,
                       "How good was the assistant's response at turn t?")


class ChatClient:
    """Minimal OpenAI chat-completions client: one POST per sample, in parallel threads."""

    def __init__(self, endpoint: str, model: str = "default", api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_tokens: int = 512) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise UserError(f"the judge endpoint must be an http(s) URL ending in /v1, not {endpoint!r}.")
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.max_tokens = model, timeout, max_tokens
        self.api_key = os.environ.get(api_key_env) if api_key_env else None

    def _one(self, messages: list[dict], temperature: float) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": self.max_tokens}).encode()
        req = urllib.request.Request(self.url, data=body, method="POST", headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise UserError(f"the judge endpoint {self.url} answered HTTP {exc.code}.") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise UserError(f"cannot reach the judge endpoint {self.url}: {getattr(exc, 'reason', exc)}.") from None
        except json.JSONDecodeError:
            raise UserError(f"the judge endpoint {self.url} did not answer JSON.") from None
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise UserError(f"the judge endpoint {self.url} answered without choices[0].message.content.") from None

    def sample(self, messages: list[dict], n: int, temperature: float) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, n)) as pool:
            return list(pool.map(lambda _: self._one(messages, temperature), range(n)))


class LLMJudge(Judge):
    name = "llm"

    def __init__(self, endpoint: str, model: str = "default", m: int = 3, temperature: float = 0.6,
                 hints: bool = True, hint_m: int = 1, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 60.0, feedback_db=None) -> None:
        if m < 1:
            raise UserError("the judge needs at least one vote (m >= 1).")
        self.client = ChatClient(endpoint, model, api_key_env=api_key_env, timeout=timeout)
        self.m, self.temperature = m, temperature
        self.hinter = None
        if hints:
            from backend.hints import LLMHintExtractor
            self.hinter = LLMHintExtractor(self.client, m=hint_m, temperature=temperature)
        self.feedback = None
        if feedback_db is not None:
            from backend.judge.feedback import FeedbackStore
            self.feedback = FeedbackStore(feedback_db)

    def judge_batch(self, items: list[Item], user: str | None = None) -> list[Judgment]:
        out = []
        for context, reply, nxt in items:
            t0 = time.perf_counter()
            texts = self.client.sample(judge_messages(context, reply, nxt), n=self.m, temperature=self.temperature)
            parsed = [parse_boxed(t) for t in texts]
            votes = [v for v in parsed if v is not None]        # unparseable votes are ignored
            reward = majority_vote(votes)
            hint = None
            if self.hinter is not None and reward != 1:
                hint = self.hinter.extract(context, reply, nxt)
            out.append(Judgment(reward=reward, votes=votes, hint=hint, judge_name=self.name,
                                latency=time.perf_counter() - t0,
                                extra={"unparseable": parsed.count(None), "raw": texts}))
        return out
