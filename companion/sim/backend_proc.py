"""The replay's backend child: the real backend server with the replay's learning method.

Run as ``python -m companion.sim.backend_proc --bind ipc://... --data-dir DIR --method M``.
It is ``companion backend`` (same :class:`backend.server.BackendServer`, the real judge
via :func:`backend.stages.default_stages`, the real megatron Trainer) plus the knobs an
experiment needs: the method (``combined``: w_rl=1, w_opd=1; ``binary``: w_opd=0;
``opd``: w_rl=0), trainer overrides as JSON, and full batches only (``train_after_s=0``)
so a seeded replay trains on the same turns every time. It prints ``READY <endpoint>``
once bound and stops on SIGTERM. :func:`start` launches it and waits for that line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from companion.errors import UserError

METHOD_WEIGHTS = {"combined": {"w_rl": 1.0, "w_opd": 1.0}, "binary": {"w_rl": 1.0, "w_opd": 0.0},
                  "opd": {"w_rl": 0.0, "w_opd": 1.0}}


class BackendChild:
    """A running backend child process; ``stop()`` ends it (SIGTERM, then kill)."""

    def __init__(self, proc: subprocess.Popen, endpoint: str) -> None:
        self.proc, self.endpoint = proc, endpoint

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(endpoint: str, data_dir: Path, method: str, *, model: str | None = None, batch_size: int = 4,
          judge: str = "embedding", judge_m: int = 3, trainer_overrides: dict | None = None,
          log_file: Path | None = None, ready_timeout: float = 180.0) -> BackendChild:
    if method not in METHOD_WEIGHTS:
        raise UserError(f"the backend trains with combined, binary or opd, not {method!r}.")
    cmd = [sys.executable, "-m", "companion.sim.backend_proc", "--bind", endpoint, "--data-dir", str(data_dir),
           "--method", method, "--batch-size", str(batch_size), "--judge", judge, "--judge-m", str(judge_m),
           "--trainer-json", json.dumps(trainer_overrides or {}), *(["--model", model] if model else [])]
    # One torch thread for training so serving in the parent keeps a core (NOTES: two
    # processes with 2 threads each on 2 cores slowed generation ~7x).
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    err = open(log_file, "ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
    deadline, line = time.time() + ready_timeout, b""
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith(b"READY") or not line:
            break
    if not line.startswith(b"READY"):
        proc.kill()
        proc.wait()
        raise UserError(f"the replay's backend did not start (exit code {proc.returncode}); see {log_file}.")
    threading.Thread(target=lambda: [None for _ in iter(proc.stdout.readline, b"")], daemon=True).start()
    return BackendChild(proc, endpoint)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m companion.sim.backend_proc")
    ap.add_argument("--bind", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--method", choices=sorted(METHOD_WEIGHTS), default="combined")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--judge", default="embedding")
    ap.add_argument("--judge-m", type=int, default=3)
    ap.add_argument("--trainer-json", default="{}")
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from backend.loops import PipelineConfig
    from backend.server import BackendServer, ServerConfig
    from backend.stages import default_stages
    from companion.config import load_settings
    from companion.models import model_fingerprint, resolve_model_path

    settings = load_settings(model=args.model)
    model_path = resolve_model_path(settings)
    overrides = {**json.loads(args.trainer_json), **METHOD_WEIGHTS[args.method]}
    stages = default_stages(model_path, model_fingerprint(model_path), judge_name=args.judge, judge_m=args.judge_m,
                            trainer_overrides=overrides)
    cfg = ServerConfig(bind=args.bind, data_dir=Path(args.data_dir), train_threads=1,
                       pipeline=PipelineConfig(batch_size=args.batch_size, max_staleness=1, train_after_s=0.0))
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


if __name__ == "__main__":
    sys.exit(main())
