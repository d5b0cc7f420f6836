"""Persona files: the shipped personas, the validator (every problem, right line), scoring, the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from companion.sim.persona import PersonaError, check_persona, load_persona, parse_persona
from companion.sim.scoring import distinct_ngram_ratio, evaluate, fill_correction, meets, score_reply
from companion.sim.user import SimulatedUser

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["student", "teacher"]


# ------------------------------------------------------------------ shipped personas
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_persona_is_valid_and_large_enough(name):
    assert check_persona(ROOT / "personas" / f"{name}.toml") == []
    p = load_persona(name)
    assert p.name == name
    assert len(p.tasks) >= 40 and len(p.eval_tasks) >= 12
    assert {"keywords", "absent", "max_words"} & {x.check for x in p.preferences}
    assert any(x.check == "keywords" for x in p.preferences), "a non-answer must not satisfy the persona"
    assert {x.check for x in p.preferences} - {"max_words", "min_words"}, "not all about length"
    assert all(len(x.corrections) >= 4 for x in p.preferences)
    assert len(p.feedback.praise) >= 5 and len(p.feedback.vague_complaints) >= 5 and len(p.feedback.neutral) >= 3
    train = {" ".join(t.prompt.lower().split()) for t in p.tasks}
    assert not train & {" ".join(t.prompt.lower().split()) for t in p.eval_tasks}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def test_feedback_phrasings_are_our_own_not_the_judges_training_data():
    """The judge is trained on backend/data; the persona must not replay its examples."""
    bank = []
    for f in (ROOT / "backend" / "data").glob("*.jsonl"):
        bank += [json.loads(line)["next"] for line in f.read_text().splitlines() if line.strip()]
    if not bank:
        pytest.skip("no judge bank in backend/data")
    bank_norm = {" ".join(_words(b)) for b in bank}
    bank_5 = {tuple(w[i:i + 5]) for b in bank for w in [_words(b)] for i in range(len(w) - 4)}
    for name in SHIPPED:
        p = load_persona(name)
        phrases = [*p.feedback.praise, *p.feedback.vague_complaints, *p.feedback.neutral, *p.feedback.rewrite_requests,
                   *(c for x in p.preferences for c in x.corrections)]
        for ph in phrases:
            w = _words(ph)
            assert " ".join(w) not in bank_norm, f"{name}: {ph!r} is in the judge's data"
            shared = [g for g in (tuple(w[i:i + 5]) for i in range(len(w) - 4)) if g in bank_5]
            assert not shared, f"{name}: {ph!r} shares {' '.join(shared[0])!r} with the judge's data"


def test_keyword_preference_rejects_a_stock_non_answer():
    p = load_persona("student")
    task = next(t for t in p.tasks if "photosynthesis" in t.prompt)
    res = score_reply(p, "The answer to this question is:", task)
    assert not res.met["answers"] and not res.all_pass
    assert score_reply(p, "Plants use sunlight to turn water and carbon dioxide into sugar.", task).all_pass


# ------------------------------------------------------------------ validator
GOOD = textwrap.dedent('''\
    name = "t"
    description = "for people"
    [[tasks]]
    prompt = "first task"
    keywords = ["alpha"]
    [[tasks]]
    prompt = """a multi-line prompt
    check = "not a key, just essay text"
    """
    keywords = ["beta"]
    [[eval_tasks]]
    prompt = "held out"
    keywords = ["gamma"]
    [[preferences]]
    id = "no-lists"
    check = "absent"
    pattern = '^\\s*- '
    corrections = ["no lists"]
    [[preferences]]
    id = "brief"
    check = "max_words"
    value = 5
    corrections = ["shorter"]
    [[preferences]]
    id = "answers"
    check = "keywords"
    corrections = ["answer it"]
    [feedback]
    praise = ["great"]
    vague_complaints = ["meh"]
    vague_rate = 0.25
    max_rewrites = 1
    ''')


def _lines(text: str) -> dict[int, str]:
    return {i: line for i, line in enumerate(text.splitlines(), 1)}


def test_valid_file_loads():
    p = parse_persona(GOOD)
    assert [x.id for x in p.preferences] == ["no-lists", "brief", "answers"]
    assert p.tasks[1].prompt.startswith("a multi-line prompt") and p.feedback.max_rewrites == 1


def test_every_problem_is_reported_with_its_line():
    bad = (GOOD.replace("pattern = '^\\s*- '", "pattern = '([unclosed'")  # bad regex
           .replace('check = "max_words"', 'check = "max_wrds"')  # unknown check
           .replace('prompt = "held out"', 'prompt = "First   TASK"')  # eval task == training task
           .replace("vague_rate = 0.25", "vague_rate = 3"))
    bad += '[[eval_tasks]]\nprompt = "no keywords here"\n'
    with pytest.raises(PersonaError) as err:
        parse_persona(bad, "bad.toml")
    lines = _lines(bad)
    got = {(p.line, p.message.split(" ")[0]) for p in err.value.problems}
    by_line = {p.line: p.message for p in err.value.problems}
    assert len(err.value.problems) == 5, err.value.problems
    assert "bad regex" in by_line[next(i for i, s in lines.items() if "[unclosed" in s)]
    assert "unknown check" in by_line[next(i for i, s in lines.items() if "max_wrds" in s)]
    assert "also a training task" in by_line[next(i for i, s in lines.items() if "[[eval_tasks]]" in s)]
    assert "between 0 and 1" in by_line[next(i for i, s in lines.items() if "vague_rate" in s)]
    last_eval = max(i for i, s in lines.items() if "[[eval_tasks]]" in s)
    assert "no keywords" in by_line[last_eval]
    assert got and "line" in str(err.value)


def test_no_eval_tasks_and_syntax_errors_are_reported():
    no_eval = re.sub(r'\[\[eval_tasks\]\]\nprompt = "held out"\nkeywords = \["gamma"\]\n', "", GOOD)
    with pytest.raises(PersonaError, match="at least one \\[\\[eval_tasks\\]\\]"):
        parse_persona(no_eval)
    broken = GOOD.replace('id = "brief"', 'id = "brief')
    with pytest.raises(PersonaError) as err:
        parse_persona(broken)
    assert err.value.problems[0].line == next(i for i, s in _lines(broken).items() if 'id = "brief' in s)


def test_keys_inside_multiline_strings_do_not_shift_lines():
    bad = GOOD.replace('id = "brief"', 'id = "no-lists"')
    with pytest.raises(PersonaError) as err:
        parse_persona(bad)
    (prob,) = err.value.problems
    assert "used twice" in prob.message
    assert prob.line == [i for i, s in _lines(bad).items() if s == 'id = "no-lists"'][1]


# ------------------------------------------------------------------ scoring
def test_checks_and_eval_aggregates():
    p = parse_persona(GOOD)
    t = p.eval_tasks[0]
    assert meets(p.preference("no-lists"), "plain words", t)
    assert not meets(p.preference("no-lists"), "intro\n- item", t)
    assert meets(p.preference("brief"), "one two three four five", t)
    assert not meets(p.preference("brief"), "one two three four five six", t)
    assert meets(p.preference("answers"), "GAMMAS are rays", t)  # case-insensitive, prefix of a word
    assert not meets(p.preference("answers"), "omegagamma", t)  # must start at a word boundary
    res = evaluate(p, ["gamma rays here"])
    assert res.all_pass == 1.0 and res.score == 1.0
    res = evaluate(p, ["- a list of many many words"])
    assert res.all_pass == 0.0 and res.score == 0.0 and res.per_pref == {"no-lists": 0.0, "brief": 0.0, "answers": 0.0}


def test_a_correction_quotes_what_broke_the_preference():
    text = (GOOD.replace('corrections = ["no lists"]', 'corrections = ["drop {found} please"]')
            .replace("pattern = '^\\s*- '", "pattern = '(?i)\\b(crucial|vital|in\\s+summary)\\b'")
            .replace('corrections = ["shorter"]', 'corrections = ["{found} words is too many"]'))
    p = parse_persona(text)
    absent, brief = p.preference("no-lists"), p.preference("brief")
    reply = "Crucial, truly vital. It is crucial.\nIn\nsummary: VITAL and crucial."
    # distinct matches, first spelling kept, a match over a line break read as one phrase, at most three
    assert fill_correction(absent, absent.corrections[0], reply) == "drop 'Crucial', 'vital' and 'In summary' please"
    assert fill_correction(absent, absent.corrections[0], "only vital") == "drop 'vital' please"
    assert fill_correction(brief, brief.corrections[0], "one two three four five six") == "6 words is too many"
    assert fill_correction(absent, "no placeholder", reply) == "no placeholder"
    # the simulated person fills it from the reply it answers
    p = parse_persona(text.replace("vague_rate = 0.25", "vague_rate = 0.0"))
    u = SimulatedUser(p, 0)
    r = u.react(p.tasks[0], "alpha is vital")
    assert r.kind == "correction" and r.named == ["no-lists"] and r.text.startswith("drop 'vital' please."), r.text


def test_only_found_and_only_where_it_can_be_filled():
    text = (GOOD.replace('corrections = ["no lists"]', 'corrections = ["drop {fuond}"]')
            .replace('corrections = ["answer it"]', 'corrections = ["say {found}"]'))
    with pytest.raises(PersonaError) as err:
        parse_persona(text)
    lines = _lines(text)
    by_line = {p.line: p.message for p in err.value.problems}
    assert len(err.value.problems) == 2, err.value.problems
    assert "unknown placeholder {fuond}" in by_line[next(i for i, s in lines.items() if "{fuond}" in s)]
    assert "only absent, max_words, min_words" in by_line[next(i for i, s in lines.items() if "say {found}" in s)]


def test_distinct_4gram_ratio_catches_loops():
    fresh = "the cat sat on the mat while the dog ran around the yard"
    loop = "I am sorry for that. " * 8
    assert distinct_ngram_ratio([fresh]) == 1.0
    assert distinct_ngram_ratio([loop]) < 0.3
    assert distinct_ngram_ratio([fresh, fresh]) == 0.5  # one stock answer for every task
    assert distinct_ngram_ratio(["too short"]) == 0.0


# ------------------------------------------------------------------ CLI
def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "companion.cli", *args], capture_output=True, text=True, input=stdin,
                          cwd=ROOT, timeout=60)


def test_cli_check_and_score(tmp_path):
    ok = _cli("personas", "check", "student")
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("pattern = '^\\s*- '", "pattern = '(('"))
    res = _cli("personas", "check", str(bad))
    assert res.returncode == 1
    assert re.search(rf"{re.escape(str(bad))}:17: .*bad regex", res.stdout), res.stdout
    res = _cli("personas", "score", "student", "--task", "2", "--json",
               "--reply", "- Plants turn sunlight into sugar.\n- They need water.")
    out = json.loads(res.stdout)
    assert out["met"] == {"no-markdown": False, "plain-words": True, "short": True, "answers": True}
    res = _cli("personas", "score", "student", "--task", "0", "--reply", "x")
    assert res.returncode == 2 and "--task must be between 1 and" in res.stderr and "Traceback" not in res.stderr
    res = _cli("personas", "check", "nobody-by-this-name")
    assert res.returncode == 2 and "known personas" in res.stderr


def test_the_quoting_experiment_is_the_student_with_only_its_filler_word_corrections_changed():
    student = load_persona("student")
    quoting = load_persona(str(ROOT / "personas" / "experiments" / "student-quoting.toml"))
    assert (quoting.tasks, quoting.eval_tasks, quoting.feedback) == (student.tasks, student.eval_tasks, student.feedback)
    for a, b in zip(student.preferences, quoting.preferences):
        assert (a.id, a.check, a.pattern, a.value) == (b.id, b.check, b.pattern, b.value)
        assert (a.corrections == b.corrections) == (a.id != "plain-words")
    plain = quoting.preference("plain-words")
    assert len(plain.corrections) == len(student.preference("plain-words").corrections)  # same random draws
    assert all("{found}" in c for c in plain.corrections)
