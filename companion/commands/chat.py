"""`companion chat`: talk to the policy; your next message is the feedback.

Default: the Textual app (companion.tui.app). ``--plain``: a plain streaming
console chat (works over any terminal, no TUI). Both record every turn in the
journal and, unless ``--no-learning``, relay them to a learning backend (a
local child process, or ``--backend tcp://host:port``) and apply the policy
versions it sends back.

Plain-mode commands: ``/good`` and ``/bad`` mark the last reply (explicit
thumbs), ``/new`` starts a new session, ``/quit`` (or Ctrl-D) ends.
"""

from __future__ import annotations

import sys
import time


def register(sub, common) -> None:
    p = sub.add_parser("chat", parents=[common], help="chat with the companion (TUI; --plain for a console chat)",
                       description="Chat with the companion. Your next message is the feedback: a learning backend "
                                   "judges each reply from it and updates the policy while you chat.")
    p.add_argument("--plain", action="store_true", help="plain streaming console chat instead of the TUI")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature; 0 = greedy (default from settings)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest reply in tokens (default from settings)")
    p.add_argument("--backend", metavar="tcp://HOST:PORT", default=None,
                   help="a running learning backend; default: start a local one")
    p.add_argument("--no-learning", action="store_true", help="chat only: no backend, turns stay in the journal")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible replies)")
    p.set_defaults(func=run)


def build_session(args):
    """Settings, engine, journal and link for a chat (shared by --plain and the TUI)."""
    from companion.cli import settings_from_args
    from companion.errors import UserError
    from companion.models import resolve_model_path

    settings = settings_from_args(args, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                  backend=args.backend)
    if args.backend and not args.backend.startswith(("tcp://", "ipc://")):
        raise UserError(f"--backend {args.backend}: expected an endpoint like tcp://host:5555.")
    path = resolve_model_path(settings)
    # Importing torch/transformers and loading weights takes seconds: say so before the screen stays blank.
    print(f"companion: loading {path.name} ...", file=sys.stderr, flush=True)
    from companion.engine.local import GenParams, LocalEngine
    from companion.journal import Journal

    params = GenParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                       top_p=settings.top_p, seed=args.seed)
    engine = LocalEngine(path, dtype=settings.dtype, threads=settings.threads)
    journal = Journal(settings.journal_path)
    journal.end_open_sessions()  # recover after a crash: last turns of old sessions become sendable
    return settings, engine, journal, params


def run(args) -> int:
    if args.plain:
        return run_plain(args)
    from companion.tui.app import run_app

    return run_app(args)


def run_plain(args) -> int:
    from companion.tui.controller import Conversation
    from companion.tui.learning import start_learning
    from companion.tui.status import LearningStatus, StatusFeed, apply_event

    settings, engine, journal, params = build_session(args)
    feed = StatusFeed()
    status = LearningStatus(version=engine.version)
    learning = start_learning(settings, engine, journal, feed, enabled=not args.no_learning)
    conv = Conversation(system_prompt=settings.system_prompt, store=journal)
    print(f"companion chat (policy v{engine.version}; /good /bad /new /quit; Ctrl-D ends)", flush=True)
    try:
        while True:
            for event in feed.drain():
                notice = apply_event(status, event)
                if event.get("kind") == "judgment":
                    print(f"  [judgment: {status.judgment_text()}]")
                if notice:
                    print(f"  [{notice}]")
            try:
                text = input("> ")
            except EOFError:
                print()
                break
            cmd = text.strip()
            if not cmd:
                continue
            if cmd in ("/quit", "/exit"):
                break
            if cmd in ("/good", "/bad"):
                value = conv.feedback(1 if cmd == "/good" else -1)
                print(f"  [feedback on the last reply: {value if value is not None else 'cleared'}]")
                continue
            if cmd == "/new":
                conv.end()
                conv = Conversation(system_prompt=settings.system_prompt, store=journal)
                print("  [new session]")
                continue
            messages = conv.begin(cmd)
            stream = engine.stream(messages, params)
            try:
                for piece in stream:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                # Ctrl-C cancels the reply, not the chat: the worker stops at the next token.
                stream.cancel()
                deadline = time.monotonic() + 30
                while stream.result is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                sys.stdout.write(" [cancelled]")
            sys.stdout.write("\n")
            if stream.result is None:
                conv.abandon()
                continue
            conv.finish(stream.result)
    finally:
        conv.end()
        learning.stop()
        journal.close()
    return 0
