"""`companion judge --reply "..." --next "..."`: try the judge on one turn; prints reward, votes and hint."""

from __future__ import annotations

import json


def register(sub, common) -> None:
    p = sub.add_parser("judge", parents=[common], help="judge one (reply, next message) pair",
                       description="Judge how good a reply was from the person's next message: prints the reward "
                                   "(majority of m votes, tie = 0), the votes and the hint for on-policy distillation.")
    p.add_argument("--reply", default="", help="the assistant's reply (the embedding judge reads only --next)")
    p.add_argument("--next", required=True, dest="next_message", help="the person's next message")
    p.add_argument("--request", default="", help="the person's request the reply answered (optional context)")
    p.add_argument("--judge", default="embedding", choices=("embedding", "llm"), help="which judge (default: embedding, CPU)")
    p.add_argument("--m", type=int, default=3, help="number of votes (default 3)")
    p.add_argument("--endpoint", help="OpenAI-compatible endpoint for --judge llm, e.g. http://localhost:30000/v1")
    p.add_argument("--model-name", default="default", help="model name sent to the endpoint")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from backend.judge import load_judge
    from companion.cli import settings_from_args
    from companion.errors import UserError

    settings = settings_from_args(args)
    if not args.next_message.strip():
        raise UserError("--next must not be empty: the judge reads the person's next message.")
    if args.judge == "llm":
        judge = load_judge("llm", m=args.m, endpoint=args.endpoint, model=args.model_name)
    else:
        judge = load_judge("embedding", m=args.m, cache_dir=settings.cache_dir)
    context = [{"role": "user", "content": args.request}] if args.request else []
    j = judge.judge(context, args.reply, args.next_message)
    if args.json:
        d = j.to_dict()
        d.pop("extra", None)
        print(json.dumps(d))
    else:
        print(f"reward: {j.reward:+d}")
        print(f"votes:  {' '.join(f'{v:+d}' for v in j.votes)}")
        print(f"hint:   {j.hint if j.hint else '(none)'}")
        print(f"judge:  {j.judge_name} ({j.latency * 1e3:.0f} ms)")
    return 0
