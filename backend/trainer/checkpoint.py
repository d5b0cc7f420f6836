"""Versioned checkpoints: each policy version is on disk before it is published.

Layout: ``<dir>/v000003/rank0.pt`` (one file per TP rank: trainable tensors,
optimizer state, counters) + ``<dir>/v000003/meta.json``, and ``<dir>/LATEST``
naming the newest complete version. A version folder is written under a
temporary name and renamed; ``LATEST`` is replaced atomically after every rank
has written its file, so a crash never leaves a half checkpoint marked latest.
Only the newest ``keep`` versions are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save(folder: Path, version: int, rank: int, state: dict, meta: dict, keep: int) -> Path:
    folder = Path(folder)
    final = folder / f"v{version:06d}"
    tmp = folder / f".v{version:06d}.tmp"
    if rank == 0:
        tmp.mkdir(parents=True, exist_ok=True)
    _barrier()
    torch.save(state, tmp / f"rank{rank}.pt")
    _barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = folder / ".LATEST.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, folder / "LATEST")
        versions = sorted(p for p in folder.glob("v[0-9]*") if p.is_dir())
        for old in versions[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest(folder: Path) -> Path | None:
    marker = Path(folder) / "LATEST"
    if not marker.exists():
        return None
    path = Path(folder) / marker.read_text().strip()
    return path if path.is_dir() else None


def load(path: Path, rank: int) -> tuple[dict, dict]:
    state = torch.load(Path(path) / f"rank{rank}.pt", map_location="cpu", weights_only=False)
    meta = json.loads((Path(path) / "meta.json").read_text())
    return state, meta
