"""Process groups for the trainer: gloo on CPU, NCCL on GPUs, world size 1 in-process by default.

Contract:
- :func:`init_parallel` makes ``torch.distributed`` and megatron's model-parallel
  state ready for a tensor-parallel degree ``tp``. Under ``torchrun`` (``RANK`` /
  ``WORLD_SIZE`` / ``MASTER_ADDR`` in the environment) it joins that group;
  otherwise it starts a world of one with a private ``file://`` rendezvous in a
  fresh temporary folder, so several processes (or test workers) never clash on a
  port; the folder is removed when the process exits.
- Already-initialised state is reused; asking for another TP degree than the one
  in place raises :class:`ParallelError` (megatron's state is process-global).
- Only tensor parallelism is supported: world size must equal ``tp`` (data
  parallelism would need gradient all-reduce across replicas, not built yet).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import torch
import torch.distributed as dist

from backend.trainer import cpu_compat
from companion.errors import UserError


class ParallelError(UserError):
    """A parallel layout that cannot be set up (wrong world size, TP not dividing heads)."""


def init_parallel(tp: int = 1, seed: int = 1234) -> None:
    cpu_compat.apply()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend)
        else:
            folder = tempfile.mkdtemp(prefix="companion-dist-")
            # the store's file lives as long as the process group; removed at exit so that every
            # trainer process (the backend, each test worker) does not leave a folder behind
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            dist.init_process_group(
                backend=backend, init_method=f"file://{folder}/rendezvous", world_size=1, rank=0
            )
    world = dist.get_world_size()
    if world != tp:
        raise ParallelError(f"world size {world} must equal the tensor-parallel degree {tp} (no data parallelism).")
    if ps.model_parallel_is_initialized():
        have = ps.get_tensor_model_parallel_world_size()
        if have != tp:
            raise ParallelError(f"model parallelism is already set up with TP={have}, not {tp}.")
    else:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def tp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank()


def tp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size()


def tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()
