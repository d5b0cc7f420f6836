"""Benchmark the trainer's peak memory on the real SmolLM2-135M: LoRA (the baseline) against full weights.

What the backend's trainer does per version, with the product's default TrainerConfig (KL anchor,
variety guard, checkpoints on): ``--updates`` updates of a batch of 4 samples (128 prompt + 128
reply tokens), each followed by a delta export packed for the link (what ``BackendServer`` sends)
and a checkpoint. Each mode runs in its own child process, so its peak resident set
(``ru_maxrss``) is its own; the LoRA figure is the baseline measured in the same run.

Why it exists: two full-mode replays at once were killed by the out-of-memory killer on this
24 GiB machine (docs/replay.md, Session 16), and no figure said how much a full-mode backend needs.

Last line: one JSON object (``lora_peak_rss_mb``, ``full_peak_rss_mb``, ``full_over_lora``,
``*_loaded_rss_mb``: the resident set after the model is loaded, before the first update).

Usage: ``.venv/bin/python scripts/bench_memory.py [--threads 2] [--updates 2] [--modes lora,full]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")


def _rss_mb() -> float:
    """Current resident set of this process in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def child(mode: str, updates: int, threads: int) -> dict:
    import torch

    from backend.delta import pack
    from backend.trainer import Trainer, TrainerConfig
    from companion.config import load_settings
    from companion.models import resolve_model_path
    from scripts.bench_train import make_batch

    torch.set_num_threads(threads)
    path = resolve_model_path(load_settings())
    with tempfile.TemporaryDirectory() as ckpt:
        tr = Trainer(TrainerConfig(mode=mode, threads=threads), model_path=path, checkpoint_dir=ckpt)
        loaded = _rss_mb()
        batch = make_batch(4)
        for _ in range(updates):
            tr.update(batch)
            _, payload = pack(tr.export_delta())
            del payload
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux -> MB
    return {f"{mode}_loaded_rss_mb": round(loaded), f"{mode}_peak_rss_mb": round(peak)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each child (default 2)")
    ap.add_argument("--updates", type=int, default=2, help="updates per mode (default 2; the guard's "
                    "snapshot and the checkpoint are made from the first)")
    ap.add_argument("--modes", default="lora,full", help="comma-separated, from lora and full (default both)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.updates, args.threads)))
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("lora", "full")]
    if bad or not modes:
        ap.error(f"--modes takes lora and/or full, not {','.join(bad) or 'nothing'}")
    if args.updates < 1:
        ap.error("--updates must be at least 1")
    res: dict = {"threads": args.threads, "updates": args.updates}
    for mode in modes:
        print(f"{mode}: {args.updates} update(s) of 4 x 256 tokens, export, checkpoint ...", flush=True)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode,
                              "--updates", str(args.updates), "--threads", str(args.threads)],
                             capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            sys.exit(f"the {mode} child failed (exit {out.returncode}; -9 is usually the out-of-memory killer):\n"
                     + out.stderr[-2000:])
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        res.update(figures)
        print(f"  resident after load {figures[f'{mode}_loaded_rss_mb']} MB, "
              f"peak {figures[f'{mode}_peak_rss_mb']} MB")
    if "lora" in modes and "full" in modes:
        res["full_over_lora"] = round(res["full_peak_rss_mb"] / res["lora_peak_rss_mb"], 2)
        print(f"full-weight peak / LoRA peak: {res['full_over_lora']:.2f}x")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
