"""`companion personas list | check FILE | score FILE --reply TEXT --task N`: persona files.

``check`` validates a persona and prints every problem with its line (exit 1 when
there are problems, 0 when valid). ``score`` shows which preferences a reply meets
for one task (``--task N`` counts training tasks from 1; ``--eval`` picks eval tasks).
"""

from __future__ import annotations

import json
import sys


def register(sub, common) -> None:
    p = sub.add_parser("personas", parents=[common], help="check persona files and score replies against them",
                       description="Work with persona files (personas/*.toml, format in docs/personas.md).")
    psub = p.add_subparsers(dest="personas_command", metavar="ACTION", required=True)
    ls = psub.add_parser("list", parents=[common], help="list the personas in personas/")
    ls.set_defaults(func=_list)
    c = psub.add_parser("check", parents=[common], help="validate a persona file and report every problem with its line")
    c.add_argument("file", metavar="FILE", help="a persona file, or a persona name from personas/")
    c.set_defaults(func=_check)
    s = psub.add_parser("score", parents=[common], help="show which preferences a reply meets")
    s.add_argument("file", metavar="FILE", help="a persona file, or a persona name from personas/")
    s.add_argument("--reply", required=True, help="the reply text to score ('-' reads it from stdin)")
    s.add_argument("--task", type=int, default=1, metavar="N", help="task number, counted from 1 (default 1)")
    s.add_argument("--eval", action="store_true", help="--task counts eval tasks instead of training tasks")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_score)


def _list(args) -> int:
    from companion.sim.persona import PERSONA_DIRS, PersonaError, load_persona

    seen = set()
    for folder in PERSONA_DIRS:
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            if path.stem in seen:
                continue
            seen.add(path.stem)
            try:
                p = load_persona(path)
                print(f"{p.name:<12} {len(p.tasks):>3} tasks {len(p.eval_tasks):>3} eval  {', '.join(x.id for x in p.preferences)}  ({path})")
            except PersonaError as exc:
                print(f"{path.stem:<12} INVALID ({len(exc.problems)} problems)  ({path})")
    return 0


def _check(args) -> int:
    from companion.sim.persona import check_persona, load_persona, resolve_persona_path

    path = resolve_persona_path(args.file)
    problems = check_persona(path)
    if problems:
        for prob in problems:
            print(f"{path}:{prob.line}: {prob.message}" if prob.line else f"{path}: {prob.message}")
        print(f"{len(problems)} problem(s).", file=sys.stderr)
        return 1
    p = load_persona(path)
    print(f"{path}: ok: persona {p.name!r}, {len(p.tasks)} training tasks, {len(p.eval_tasks)} eval tasks, "
          f"preferences {', '.join(x.id for x in p.preferences)}.")
    return 0


def _score(args) -> int:
    from companion.errors import UserError
    from companion.sim.persona import load_persona
    from companion.sim.scoring import score_reply

    persona = load_persona(args.file)
    tasks = persona.eval_tasks if args.eval else persona.tasks
    kind = "eval task" if args.eval else "task"
    if not 1 <= args.task <= len(tasks):
        raise UserError(f"--task must be between 1 and {len(tasks)} ({persona.name} has {len(tasks)} {kind}s).")
    task = tasks[args.task - 1]
    reply = sys.stdin.read() if args.reply == "-" else args.reply
    res = score_reply(persona, reply, task)
    if args.json:
        print(json.dumps({"persona": persona.name, "task": args.task, "eval": args.eval, "met": res.met,
                          "score": res.score, "all_pass": res.all_pass}))
        return 0
    print(f"{persona.name}, {kind} {args.task}: {task.prompt.splitlines()[0][:80]}")
    for pref in persona.preferences:
        mark = "meets " if res.met[pref.id] else "FAILS "
        print(f"  {mark} {pref.id:<16} {pref.description}")
    print(f"score {res.score:.2f} ({sum(res.met.values())}/{len(res.met)}), all preferences met: {'yes' if res.all_pass else 'no'}")
    return 0
