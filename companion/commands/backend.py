"""`companion backend`: run the learning backend (ZeroMQ ROUTER + judging, samples, training, publishing).

Prints ``READY <endpoint>`` on stdout once bound (``companion.link.start_local_backend``
waits for that line), then serves until SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading


def register(sub, common) -> None:
    p = sub.add_parser("backend", parents=[common], help="run the learning backend (local or remote)",
                       description="Run the learning backend: stores turns, judges them, trains the policy and "
                       "pushes weight deltas to connected companions. Binding beyond loopback requires CURVE keys.")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555",
                   help="ZeroMQ endpoint to bind: ipc:///path or tcp://host:port (default tcp://127.0.0.1:5555)")
    p.add_argument("--keys-dir", metavar="DIR", help="CURVE keys folder (default <data-dir>/keys)")
    p.add_argument("--stages", choices=("default", "tiny"), default="default",
                   help="default: the real judge and megatron trainer; tiny: a fast toy set for tests and benchmarks")
    p.add_argument("--method", choices=("combined", "binary", "opd"), default="combined",
                   help="learning signal: binary RL from the judge, OPD from hints, or both (default combined)")
    p.add_argument("--judge", default="embedding", help="judge for backend.judge.load_judge (default embedding)")
    p.add_argument("--judge-m", type=int, default=3, help="judge votes per turn, majority wins (default 3)")
    p.add_argument("--trainer-json", metavar="JSON", default="{}",
                   help='TrainerConfig overrides as JSON, e.g. \'{"lr": 3e-4}\' (docs/trainer.md)')
    p.add_argument("--batch-size", type=int, default=4, help="samples per policy update (default 4)")
    p.add_argument("--max-staleness", type=int, default=1,
                   help="drop samples from a policy more than N versions old (default 1)")
    p.add_argument("--train-after", type=float, default=30.0,
                   help="train a partial batch after its oldest sample waited this many seconds; "
                        "0 = full batches only (default 30)")
    p.add_argument("--train-threads", type=int, default=1, help="torch threads for training (default 1)")
    p.add_argument("--tiny-slow", type=float, default=0.0, help=argparse_suppress())
    p.add_argument("-v", "--verbose", action="store_true", help="log each stage to stderr")
    p.set_defaults(func=_run)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def _run(args) -> int:
    from backend.loops import PipelineConfig
    from backend.server import BackendServer, ServerConfig
    from backend.stages import default_stages, method_trainer_overrides, tiny_stages
    from backend.trainer.config import config_from_overrides
    from companion.cli import settings_from_args
    from companion.errors import UserError
    from companion.keys import keys_dir
    from companion.models import model_fingerprint, resolve_model_path

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = settings_from_args(args)
    try:
        pcfg = PipelineConfig(batch_size=args.batch_size, max_staleness=args.max_staleness,
                              train_after_s=args.train_after)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        overrides = json.loads(args.trainer_json)
    except json.JSONDecodeError as exc:
        raise UserError(f"--trainer-json is not valid JSON: {exc}.") from None
    if not isinstance(overrides, dict):
        raise UserError("--trainer-json must be a JSON object of TrainerConfig fields.")
    overrides = method_trainer_overrides(args.method, overrides)  # explicit w_rl / w_opd win
    config_from_overrides(overrides)  # a misspelt or mistyped field fails here, not at the first update
    model_path = resolve_model_path(settings)
    fp = model_fingerprint(model_path)
    if args.stages == "tiny":
        stages = tiny_stages(model_path, fp, slow_s=args.tiny_slow)
    else:
        stages = default_stages(model_path, fp, judge_name=args.judge, judge_m=args.judge_m,
                                trainer_overrides=overrides)
    from pathlib import Path

    cfg = ServerConfig(bind=args.bind, data_dir=settings.data_dir / "backend",
                       keys_dir=Path(args.keys_dir).expanduser() if args.keys_dir else keys_dir(settings.data_dir),
                       train_threads=args.train_threads, pipeline=pcfg)
    server = BackendServer(cfg, stages)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    print(f"READY {server.endpoint}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0
