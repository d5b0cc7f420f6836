"""Persona files (``personas/*.toml``): the format, the loader and the validator.

A persona describes a simulated person for replays: the prompts they send while
the assistant learns (``tasks``), held-out prompts used only for evaluation
(``eval_tasks``), the preferences a reply must meet (checked by rules, see
:mod:`companion.sim.scoring`) and how they phrase their reactions (``feedback``).
The format is documented in docs/personas.md.

Contract
- :func:`check_persona` returns *every* problem of a file, each with the 1-based
  line it sits on (``tomllib`` keeps no positions, so :class:`_LineIndex` scans
  the text for table headers and keys). An empty list means the file is valid.
- :func:`load_persona` returns a :class:`Persona` or raises :class:`PersonaError`
  (a :class:`~companion.errors.UserError`) whose message lists all problems.
- Invariants of a loaded persona: at least one training task and one eval task;
  no eval prompt is also a training prompt (compared after whitespace/case
  normalisation), so evaluation never measures memorised training turns; every
  regex compiles; every preference has at least one correction phrasing; when a
  ``keywords`` preference exists every task carries keywords; the only placeholder a
  correction may hold is ``{found}``, and only in an absent / max_words / min_words
  preference (the checks that have something in the reply to quote).
- The ``description`` is for people and is never shown to the policy.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from companion.errors import UserError

CHECKS = ("absent", "present", "max_words", "min_words", "keywords")
TOP_KEYS = {"name", "description", "tasks", "eval_tasks", "preferences", "feedback"}
TASK_KEYS = {"prompt", "keywords"}
PREF_KEYS = {"id", "check", "pattern", "value", "corrections", "description"}
FEEDBACK_KEYS = {"praise", "vague_complaints", "neutral", "rewrite_requests", "vague_rate", "neutral_rate",
                 "rewrite_rate", "max_rewrites"}
# Where `--persona NAME` looks: the repository's personas/ folder, then ./personas.
PERSONA_DIRS = (Path(__file__).resolve().parents[2] / "personas", Path("personas"))

DEFAULT_REWRITE_REQUESTS = ["Can you try that again?"]
# A correction phrasing may quote the reply, as a person points at what annoyed them:
# {found} is filled per reply (companion.sim.scoring.fill_correction) with the text an
# `absent` pattern matched, or the word count that broke a max_words / min_words limit.
PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")
FOUND_CHECKS = ("absent", "max_words", "min_words")


class PersonaError(UserError):
    """A persona file that cannot be used; the message lists every problem with its line."""

    def __init__(self, path: Path | str, problems: list["Problem"]):
        self.path = Path(path)
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"persona file {path} has {len(problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based; 0 when the problem is about the whole file
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


@dataclass(frozen=True)
class Task:
    prompt: str
    keywords: tuple[str, ...] = ()


@dataclass(frozen=True)
class Preference:
    id: str
    check: str
    pattern: re.Pattern | None = None
    value: int | None = None
    corrections: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class Feedback:
    praise: tuple[str, ...]
    vague_complaints: tuple[str, ...] = ()
    neutral: tuple[str, ...] = ()
    rewrite_requests: tuple[str, ...] = tuple(DEFAULT_REWRITE_REQUESTS)
    vague_rate: float = 0.2
    neutral_rate: float = 0.0
    max_rewrites: int = 2
    rewrite_rate: float = 0.5  # chance that a failing reply (rewrites left) gets a rewrite request


@dataclass(frozen=True)
class Persona:
    name: str
    description: str
    tasks: tuple[Task, ...]
    eval_tasks: tuple[Task, ...]
    preferences: tuple[Preference, ...]
    feedback: Feedback
    path: Path | None = field(default=None, compare=False)

    def preference(self, pid: str) -> Preference:
        return next(p for p in self.preferences if p.id == pid)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


class _LineIndex:
    """Maps (table, index, key) to the line where that key is written.

    ``table`` is "" for top-level keys, ``tasks``/``eval_tasks``/``preferences``
    for array-of-tables entries (``index`` counts them from 0) and ``feedback``.
    Lines inside multi-line strings are skipped, so essay text never looks like a key.
    """

    _header_aot = re.compile(r"^\s*\[\[\s*([A-Za-z0-9_.-]+)\s*\]\]")
    _header = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
    _key = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")

    def __init__(self, text: str):
        self.keys: dict[tuple[str, int, str], int] = {}
        self.headers: dict[tuple[str, int], int] = {}
        counts: dict[str, int] = {}
        table, index = "", 0
        in_string: str | None = None
        for lineno, line in enumerate(text.splitlines(), start=1):
            if in_string is None:
                if m := self._header_aot.match(line):
                    table = m.group(1)
                    index = counts.get(table, 0)
                    counts[table] = index + 1
                    self.headers[(table, index)] = lineno
                elif m := self._header.match(line):
                    table, index = m.group(1), 0
                    self.headers[(table, 0)] = lineno
                elif m := self._key.match(line):
                    self.keys.setdefault((table, index, m.group(1)), lineno)
            # Toggle multi-line string state on each unescaped triple quote.
            for quote in re.findall(r'"""|\'\'\'', line):
                if in_string is None:
                    in_string = quote
                elif in_string == quote:
                    in_string = None

    def line(self, table: str, index: int = 0, key: str | None = None) -> int:
        if key is not None and (table, index, key) in self.keys:
            return self.keys[(table, index, key)]
        return self.headers.get((table, index), 0)


def _str_list(value, what: str, line: int, problems: list[Problem], allow_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(Problem(line, f"{what} must be a list of strings."))
        return ()
    items = tuple(v.strip() for v in value)
    if any(not v for v in items):
        problems.append(Problem(line, f"{what} contains an empty string."))
    if not items and not allow_empty:
        problems.append(Problem(line, f"{what} must not be empty."))
    return tuple(v for v in items if v)


def _parse_tasks(data: dict, table: str, idx: _LineIndex, problems: list[Problem]) -> list[tuple[Task, int]]:
    raw = data.get(table, [])
    if not isinstance(raw, list):
        problems.append(Problem(idx.line("", 0, table), f"{table} must be an array of tables ([[{table}]])."))
        return []
    out = []
    for i, entry in enumerate(raw):
        line = idx.line(table, i)
        if not isinstance(entry, dict):
            problems.append(Problem(line, f"{table} entry {i + 1} must be a table."))
            continue
        for key in sorted(set(entry) - TASK_KEYS):
            problems.append(Problem(idx.line(table, i, key), f"unknown key {key!r} in {table} entry {i + 1} (allowed: prompt, keywords)."))
        prompt = entry.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(Problem(idx.line(table, i, "prompt"), f"{table} entry {i + 1} needs a non-empty prompt."))
            continue
        keywords: tuple[str, ...] = ()
        if "keywords" in entry:
            keywords = _str_list(entry["keywords"], f"keywords of {table} entry {i + 1}", idx.line(table, i, "keywords"), problems)
        out.append((Task(prompt.strip(), keywords), line))
    return out


def _parse_preferences(data: dict, idx: _LineIndex, problems: list[Problem]) -> list[Preference]:
    raw = data.get("preferences", [])
    if not isinstance(raw, list) or not raw:
        problems.append(Problem(idx.line("", 0, "preferences"), "a persona needs at least one [[preferences]] entry."))
        return []
    prefs, seen = [], {}
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            problems.append(Problem(idx.line("preferences", i), f"preferences entry {i + 1} must be a table."))
            continue
        at = lambda key=None: idx.line("preferences", i, key)  # noqa: E731
        for key in sorted(set(entry) - PREF_KEYS):
            problems.append(Problem(at(key), f"unknown key {key!r} in preference {i + 1} (allowed: {', '.join(sorted(PREF_KEYS))})."))
        pid = entry.get("id")
        if not isinstance(pid, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", pid or ""):
            problems.append(Problem(at("id"), f"preference {i + 1} needs an id made of letters, digits, '-', '_' or '.'."))
            pid = f"#{i + 1}"
        elif pid in seen:
            problems.append(Problem(at("id"), f"preference id {pid!r} is used twice (first on line {seen[pid]})."))
        seen.setdefault(pid, at("id"))
        check = entry.get("check")
        pattern, value = None, None
        if check not in CHECKS:
            problems.append(Problem(at("check"), f"preference {pid!r} has unknown check {check!r} (use one of: {', '.join(CHECKS)})."))
        elif check in ("absent", "present"):
            raw_pat = entry.get("pattern")
            if not isinstance(raw_pat, str) or not raw_pat:
                problems.append(Problem(at("pattern") or at("check"), f"preference {pid!r} (check {check}) needs a regex pattern."))
            else:
                try:
                    # MULTILINE so ^ and $ mean line starts/ends (bullets, headings).
                    pattern = re.compile(raw_pat, re.MULTILINE)
                except re.error as exc:
                    problems.append(Problem(at("pattern"), f"preference {pid!r} has a bad regex: {exc}."))
        elif check in ("max_words", "min_words"):
            value = entry.get("value")
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(Problem(at("value") or at("check"), f"preference {pid!r} (check {check}) needs a positive integer value."))
                value = None
        corrections = _str_list(entry.get("corrections", []), f"corrections of preference {pid!r}", at("corrections") or at(), problems)
        for phrasing in corrections:
            for name in PLACEHOLDER.findall(phrasing):
                if name != "found":
                    problems.append(Problem(at("corrections"), f"correction {phrasing!r} of preference {pid!r} has an unknown placeholder {{{name}}} (the only one is {{found}})."))
                elif check not in FOUND_CHECKS:
                    problems.append(Problem(at("corrections"), f"correction {phrasing!r} of preference {pid!r} uses {{found}}, which only {', '.join(FOUND_CHECKS)} checks can fill."))
        desc = entry.get("description", "")
        if not isinstance(desc, str):
            problems.append(Problem(at("description"), f"description of preference {pid!r} must be a string."))
            desc = ""
        prefs.append(Preference(pid, check if check in CHECKS else "", pattern, value, corrections, desc))
    return prefs


def _parse_feedback(data: dict, idx: _LineIndex, problems: list[Problem]) -> Feedback:
    raw = data.get("feedback")
    if not isinstance(raw, dict):
        problems.append(Problem(idx.line("", 0, "feedback"), "a persona needs a [feedback] table with at least praise phrasings."))
        return Feedback(praise=("Thanks.",))
    at = lambda key=None: idx.line("feedback", 0, key)  # noqa: E731
    for key in sorted(set(raw) - FEEDBACK_KEYS):
        problems.append(Problem(at(key), f"unknown key {key!r} in [feedback] (allowed: {', '.join(sorted(FEEDBACK_KEYS))})."))
    praise = _str_list(raw.get("praise", []), "feedback.praise", at("praise") or at(), problems)
    vague = _str_list(raw.get("vague_complaints", []), "feedback.vague_complaints", at("vague_complaints") or at(), problems, allow_empty=True)
    neutral = _str_list(raw.get("neutral", []), "feedback.neutral", at("neutral") or at(), problems, allow_empty=True)
    rewrites = _str_list(raw.get("rewrite_requests", DEFAULT_REWRITE_REQUESTS), "feedback.rewrite_requests", at("rewrite_requests") or at(), problems)
    rates = {}
    for key, default in (("vague_rate", 0.2), ("neutral_rate", 0.0), ("rewrite_rate", 0.5)):
        val = raw.get(key, default)
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0.0 <= val <= 1.0:
            problems.append(Problem(at(key), f"feedback.{key} must be a number between 0 and 1."))
            val = default
        rates[key] = float(val)
    if rates["vague_rate"] > 0 and not vague:
        problems.append(Problem(at("vague_rate"), "feedback.vague_rate is above 0 but there are no vague_complaints."))
    if rates["neutral_rate"] > 0 and not neutral:
        problems.append(Problem(at("neutral_rate"), "feedback.neutral_rate is above 0 but there are no neutral phrasings."))
    max_rewrites = raw.get("max_rewrites", 2)
    if isinstance(max_rewrites, bool) or not isinstance(max_rewrites, int) or max_rewrites < 0:
        problems.append(Problem(at("max_rewrites"), "feedback.max_rewrites must be a whole number, 0 or more."))
        max_rewrites = 0
    return Feedback(praise or ("Thanks.",), vague, neutral, rewrites or tuple(DEFAULT_REWRITE_REQUESTS),
                    rates["vague_rate"], rates["neutral_rate"], max_rewrites, rates["rewrite_rate"])


def _validate(text: str, path: Path) -> tuple[Persona | None, list[Problem]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        return None, [Problem(int(m.group(1)) if m else 0, f"not valid TOML: {exc}.")]
    idx = _LineIndex(text)
    problems: list[Problem] = []
    for key in sorted(set(data) - TOP_KEYS):
        problems.append(Problem(idx.line("", 0, key) or idx.line(key), f"unknown top-level key {key!r} (allowed: {', '.join(sorted(TOP_KEYS))})."))
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(Problem(idx.line("", 0, "name"), "a persona needs a non-empty name."))
        name = path.stem
    description = data.get("description", "")
    if not isinstance(description, str):
        problems.append(Problem(idx.line("", 0, "description"), "description must be a string."))
        description = ""
    tasks = _parse_tasks(data, "tasks", idx, problems)
    evals = _parse_tasks(data, "eval_tasks", idx, problems)
    if not tasks:
        problems.append(Problem(0, "a persona needs at least one [[tasks]] entry (prompts sent while learning)."))
    if not evals:
        problems.append(Problem(0, "a persona needs at least one [[eval_tasks]] entry (held-out prompts for evaluation)."))
    train_lines: dict[str, int] = {}
    for task, line in tasks:
        key = _norm(task.prompt)
        if key in train_lines:
            problems.append(Problem(line, f"this training task repeats the one on line {train_lines[key]}."))
        train_lines.setdefault(key, line)
    eval_lines: dict[str, int] = {}
    for task, line in evals:
        key = _norm(task.prompt)
        if key in train_lines:
            problems.append(Problem(line, f"this eval task is also a training task (line {train_lines[key]}); eval tasks must be held out."))
        elif key in eval_lines:
            problems.append(Problem(line, f"this eval task repeats the one on line {eval_lines[key]}."))
        eval_lines.setdefault(key, line)
    prefs = _parse_preferences(data, idx, problems)
    if any(p.check == "keywords" for p in prefs):
        for task, line in tasks + evals:
            if not task.keywords:
                problems.append(Problem(line, "this task has no keywords but the persona has a 'keywords' preference."))
    feedback = _parse_feedback(data, idx, problems)
    persona = Persona(name.strip(), description, tuple(t for t, _ in tasks), tuple(t for t, _ in evals),
                      tuple(prefs), feedback, path)
    return persona, problems


def resolve_persona_path(name_or_path: str | Path) -> Path:
    """A path to an existing file, or a persona name looked up in ``personas/``."""
    cand = Path(name_or_path).expanduser()
    if cand.is_file():
        return cand
    if cand.suffix != ".toml" and "/" not in str(name_or_path):
        for folder in PERSONA_DIRS:
            if (folder / f"{name_or_path}.toml").is_file():
                return folder / f"{name_or_path}.toml"
    known = sorted({p.stem for d in PERSONA_DIRS if d.is_dir() for p in d.glob("*.toml")})
    raise UserError(f"no persona file or persona named {str(name_or_path)!r} (known personas: {', '.join(known) or 'none'}).")


def check_persona(path: str | Path) -> list[Problem]:
    """Every problem of a persona file, in line order (empty list: valid)."""
    path = resolve_persona_path(path)
    _, problems = _validate(path.read_text(encoding="utf-8"), path)
    return sorted(problems, key=lambda p: p.line)


def parse_persona(text: str, path: str | Path = "<string>") -> Persona:
    persona, problems = _validate(text, Path(path))
    if problems or persona is None:
        raise PersonaError(path, sorted(problems, key=lambda p: p.line))
    return persona


def load_persona(name_or_path: str | Path) -> Persona:
    """Load and validate a persona by name (``personas/<name>.toml``) or path."""
    path = resolve_persona_path(name_or_path)
    return parse_persona(path.read_text(encoding="utf-8"), path)
