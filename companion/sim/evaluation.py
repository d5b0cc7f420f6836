"""Greedy evaluation of a serving engine on a persona's held-out eval tasks.

Contract: every eval task is sent as a fresh conversation ``[system, user]`` with
the given system prompt (never a learned hint, except in the labelled ``memory``
baseline which passes its own system prompt), decoded greedily with
``engine.generate_greedy_batch`` in chunks of ``batch_size`` and scored with
:func:`companion.sim.scoring.evaluate`. Greedy decoding makes the result a
function of the weights alone, so two evaluations of one version agree.
"""

from __future__ import annotations

from companion.sim.persona import Persona
from companion.sim.scoring import EvalResult, evaluate


def eval_messages(persona: Persona, system_prompt: str) -> list[list[dict]]:
    return [[{"role": "system", "content": system_prompt}, {"role": "user", "content": t.prompt}] for t in persona.eval_tasks]


def run_eval(engine, persona: Persona, system_prompt: str, max_new_tokens: int, batch_size: int = 16) -> EvalResult:
    """Greedy replies to every eval task, scored against the persona."""
    msgs = eval_messages(persona, system_prompt)
    replies: list[str] = []
    for i in range(0, len(msgs), batch_size):
        replies.extend(r.text.strip() for r in engine.generate_greedy_batch(msgs[i:i + batch_size], max_new_tokens))
    return evaluate(persona, replies)
