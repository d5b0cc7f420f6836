"""The persona simulator's feedback phrasings must not appear in the judge's data.

Replays score the judge honestly only if the judge never trained on (or was
tuned on) the exact sentences the simulated people say. This loads every
personas/*.toml present, collects every phrasing it can say (all lists of
strings at any depth: corrections, praise, complaints, neutral, rewrite
requests...; task keywords excluded) and checks that none matches a row of
the training or held-out bank exactly or near-exactly after normalisation
(lower case, punctuation dropped, whitespace collapsed; near = difflib ratio
>= 0.85).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path

import pytest

from backend.judge.data import HELDOUT2_PATH, HELDOUT3_PATH, HELDOUT_PATH, NEGATION_PROBE_PATH, TRAIN_PATH, load_bank

PERSONAS = Path(__file__).resolve().parent.parent / "personas"
SKIP_KEYS = {"keywords", "tasks", "eval_tasks"}


def normalise(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", text.lower().replace("'", ""))
    return " ".join(text.split())


def phrasings(node, key: str = "") -> list[str]:
    """Every string that sits in a list anywhere in a persona file (its utterances)."""
    if key in SKIP_KEYS:
        return []
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in phrasings(v, k)]
    if isinstance(node, list):
        out = []
        for v in node:
            out += [v] if isinstance(v, str) else phrasings(v, key)
        return out
    return []


def overlaps(persona_lines: list[str], bank_lines: list[str], ratio: float = 0.85) -> list[tuple[str, str]]:
    bank = {normalise(b): b for b in bank_lines}
    found = []
    for p in persona_lines:
        n = normalise(p)
        if not n:
            continue
        if n in bank:
            found.append((p, bank[n]))
            continue
        for nb, b in bank.items():
            sm = difflib.SequenceMatcher(None, n, nb)
            if sm.real_quick_ratio() >= ratio and sm.quick_ratio() >= ratio and sm.ratio() >= ratio:
                found.append((p, b))
                break
    return found


def test_overlap_checker_catches_exact_and_near_copies():
    bank = ["Way too long, I just need the answer.", "Thanks, that worked."]
    assert overlaps(["way too long - I just need the answer"], bank)          # exact after normalising
    assert overlaps(["Way too long, I just need an answer!"], bank)           # near-exact
    assert not overlaps(["Could you write the comment again?"], bank)
    toml = {"preferences": [{"corrections": ["a", "b"], "pattern": "x"}], "feedback": {"praise": ["c"]},
            "tasks": [{"prompt": "p", "keywords": ["k"]}]}
    assert sorted(phrasings(toml)) == ["a", "b", "c"]


@pytest.mark.parametrize("persona", sorted(PERSONAS.glob("*.toml")), ids=lambda p: p.name)
def test_no_persona_phrasing_in_judge_data(persona):
    lines = phrasings(tomllib.loads(persona.read_text(encoding="utf-8")))
    paths = (TRAIN_PATH, HELDOUT_PATH, HELDOUT2_PATH, HELDOUT3_PATH, NEGATION_PROBE_PATH)
    bank = [r["next"] for path in paths for r in load_bank(path)]
    found = overlaps(lines, bank)
    assert not found, f"{persona.name} phrasings found in the judge's bank: {found}"


@pytest.mark.parametrize("path", [NEGATION_PROBE_PATH, HELDOUT3_PATH], ids=["negation", "v3"])
def test_probe_and_v3_are_not_in_the_training_bank(path):
    """They measure generalisation to unseen phrasings; a copy in the bank would void that."""
    found = overlaps([r["next"] for r in load_bank(path)], [r["next"] for r in load_bank(TRAIN_PATH)])
    assert not found, f"rows of {path.name} found in the training bank: {found}"
