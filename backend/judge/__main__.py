"""``python -m backend.judge FILE.jsonl``: judge rows of {"reply", "next"} (optional "context"),
print one JSON judgment per row (reward, votes, hint, judge_name, latency). ``-`` reads stdin.
Bad input (missing file, a row that is not JSON or lacks "next") exits 2 with one sentence.
"""

from __future__ import annotations

import argparse
import json
import sys

from companion.errors import UserError


def _rows(path: str):
    fh = sys.stdin if path == "-" else None
    if fh is None:
        try:
            fh = open(path, encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}.") from None
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"line {n} of {path} is not JSON.") from None
            if not isinstance(row, dict) or not isinstance(row.get("next"), str):
                raise UserError(f"line {n} of {path} needs a \"next\" string (and usually a \"reply\").")
            yield row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend.judge", description=__doc__.splitlines()[0])
    ap.add_argument("file", help="JSONL file of {\"reply\", \"next\"} rows, or - for stdin")
    ap.add_argument("--judge", default="embedding", choices=("embedding", "llm"))
    ap.add_argument("--m", type=int, default=3, help="votes per judgment (default 3)")
    ap.add_argument("--endpoint", help="OpenAI-compatible endpoint for --judge llm, e.g. http://localhost:30000/v1")
    ap.add_argument("--model-name", default="default", help="model name sent to the endpoint")
    ap.add_argument("--batch", type=int, default=16, help="judgments per batch (default 16)")
    args = ap.parse_args(argv)
    try:
        from backend.judge import load_judge
        kw = {"endpoint": args.endpoint, "model": args.model_name} if args.judge == "llm" else {}
        rows = list(_rows(args.file))
        judge = load_judge(args.judge, m=args.m, **kw)
        for i in range(0, len(rows), max(1, args.batch)):
            chunk = rows[i:i + args.batch]
            items = [(r.get("context") or [], r.get("reply") or "", r["next"]) for r in chunk]
            for j in judge.judge_batch(items):
                d = j.to_dict()
                d.pop("extra", None)
                print(json.dumps(d), flush=True)
    except UserError as exc:
        print(f"python -m backend.judge: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
