"""History and learned-preference views over the journal, shared by the screens and the CLI.

Contract (all functions read the journal only, never write):
- :func:`history_rows` -> one flat dict per turn, oldest first: turn_id, session_id,
  session (title), index, created_at, prompt (last user message), reply,
  next_message, reward, votes, hint, policy_version, feedback, judged. Filters:
  ``session_id`` and ``reward`` (-1/0/1, or "none" for turns not judged yet).
- :func:`version_stats` -> per policy version that served judged turns:
  {version, n, positive_share} ordered by version (share of +1 among judged turns).
- :func:`learned_preferences` -> the distilled hints grouped by meaning
  (companion.tui.grouping), each {hint (the newest wording), hints (distinct
  wordings), count, first_at, last_at, versions (policy versions whose
  ``learned_from.turn_ids`` include a turn with this hint), turn_ids}; most
  frequent first. ``embed=None`` groups exact duplicates only (no model load).
"""

from __future__ import annotations

import json
import time
from typing import Callable

from companion.tui.grouping import DEFAULT_THRESHOLD, group_texts


def _prompt_of(turn: dict) -> str:
    for m in reversed(turn.get("messages") or []):
        if m.get("role") == "user":
            return m.get("content", "")
    return ""


def history_rows(journal, session_id: str | None = None, reward: int | str | None = None) -> list[dict]:
    titles = {s["id"]: s.get("title") or "Chat" for s in journal.sessions()}
    if reward == "none":
        turns = [t for t in journal.turns(session_id=session_id) if t.get("reward") is None]
    else:
        turns = journal.turns(session_id=session_id, reward=None if reward is None else int(reward))
    rows = []
    for t in turns:
        rows.append({
            "turn_id": t["turn_id"], "session_id": t["session_id"], "session": titles.get(t["session_id"], "?"),
            "index": t["idx"], "created_at": t["created_at"], "prompt": _prompt_of(t), "reply": t["reply"],
            "next_message": t.get("next_message"), "next_state": t.get("next_state"),
            "reward": t.get("reward"), "votes": t.get("votes") or [], "hint": t.get("hint"),
            "judge": t.get("judge_name"), "policy_version": t["policy_version"], "feedback": t.get("feedback"),
            "judged": t.get("reward") is not None,
        })
    return rows


def version_stats(journal) -> list[dict]:
    by_version: dict[int, list[int]] = {}
    for t in journal.turns():
        if t.get("reward") is not None:
            by_version.setdefault(int(t["policy_version"]), []).append(int(t["reward"]))
    return [
        {"version": v, "n": len(rs), "positive_share": sum(r == 1 for r in rs) / len(rs)}
        for v, rs in sorted(by_version.items())
    ]


def learned_preferences(
    journal,
    embed: Callable | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[dict]:
    hinted = [t for t in journal.turns() if (t.get("hint") or "").strip()]
    if not hinted:
        return []
    trained_on: dict[str, set[int]] = {}
    for v in journal.versions():
        for tid in (v.get("learned_from") or {}).get("turn_ids") or []:
            trained_on.setdefault(tid, set()).add(int(v["version"]))
    texts = [t["hint"].strip() for t in hinted]
    if embed is None:
        # Exact duplicates only: an embedding function that makes every distinct text orthogonal.
        import numpy as np

        def embed(batch):
            return np.eye(len(batch))

    out = []
    for idxs in group_texts(texts, embed, threshold):
        members = [hinted[i] for i in idxs]
        when = [m.get("judged_at") or m["created_at"] for m in members]
        newest = max(range(len(members)), key=lambda k: when[k])
        wordings = list(dict.fromkeys(texts[i] for i in idxs))
        versions = sorted(set().union(*(trained_on.get(m["turn_id"], set()) for m in members)))
        out.append({
            "hint": texts[idxs[newest]], "hints": wordings, "count": len(members),
            "first_at": min(when), "last_at": max(when), "versions": versions,
            "turn_ids": [m["turn_id"] for m in members],
        })
    out.sort(key=lambda g: (-g["count"], -g["last_at"]))
    return out


def ago(ts: float | None, now: float | None = None) -> str:
    """'3m ago' style age of a unix time; '-' when unknown."""
    if not ts:
        return "-"
    s = max(0, int((now or time.time()) - ts))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit} ago"
    return f"{s}s ago"


def fmt_votes(votes) -> str:
    return " ".join(f"{int(v):+d}" for v in votes or []) or "-"


def fmt_reward(r) -> str:
    return "-" if r is None else f"{int(r):+d}"


def to_json(rows) -> str:
    return json.dumps(rows, indent=2, ensure_ascii=False, default=str)


def version_learned_from(journal, version: int) -> dict | None:
    """What policy ``version`` learned from (``with_hints``), or None if the journal has not noted it."""
    for v in reversed(journal.versions()):
        if v["version"] == version:
            return with_hints(journal, v.get("learned_from"))
    return None


def with_hints(journal, learned_from: dict | None) -> dict:
    """``learned_from`` plus ``hints``: the hints of its turns as the journal knows them.

    The backend's summary lists the trained turn ids; the hints come from the
    judgments this journal received, so the notice can say *what* was learned.
    """
    out = dict(learned_from or {})
    if out.get("hints") or journal is None:
        return out
    hints = []
    for tid in out.get("turn_ids") or []:
        try:
            h = journal.turn(tid).get("hint")
        except Exception:  # a turn deleted locally: nothing to show for it
            continue
        if h and h not in hints:
            hints.append(h)
    out["hints"] = hints
    return out
