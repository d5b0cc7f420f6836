"""Tensor parallelism on CPU through gloo: torchrun TP=3 (3 processes) equals TP=1.

A tiny random Llama with 3 KV groups (TP must divide them), the real SmolLM2
tokenizer. Both runs go through ``backend.trainer.tp_check`` in subprocesses,
so this test never touches the pytest process's own process groups.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, env):
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.timeout(300)
def test_tp3_matches_tp1_logits_loss_and_delta(tmp_path):
    from conftest import make_tiny_llama

    model = make_tiny_llama(tmp_path / "tiny3", num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one, three = tmp_path / "tp1.pt", tmp_path / "tp3.pt"
    _run([sys.executable, "-m", "backend.trainer.tp_check", "--model", str(model), "--out", str(one)], env)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
          "-m", "backend.trainer.tp_check", "--model", str(model), "--out", str(three)], env)
    a, b = torch.load(one), torch.load(three)
    assert float((a["logits_before"] - b["logits_before"]).abs().max()) < 1e-4
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert float((a["logits_after"] - a["logits_before"]).abs().max()) > 1e-3  # the step did something
    assert float((a["logits_after"] - b["logits_after"]).abs().max()) < 1e-4
    assert a["delta"].keys() == b["delta"].keys()
    assert max(float((a["delta"][k] - b["delta"][k]).abs().max()) for k in a["delta"]) < 1e-5
