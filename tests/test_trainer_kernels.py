"""The trainer's two CPU speed pieces compute exactly what they replace: SDPA core attention
(vs megatron's DotProductAttention) and the LoRA factor product's hand-written backward; and the
process group's private rendezvous folder (``init_parallel``) does not outlive the process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend.trainer import cpu_compat
from backend.trainer.dist import init_parallel
from backend.trainer.lora import _SkinnyLinear

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape", [(7, 5, 3), (7, 3, 11)])  # (N, in, out): w = A [r, in] / B [out, r]
def test_skinny_linear_gradients_match_autograd(shape):
    n, i, o = shape
    x = torch.randn(n, i, dtype=torch.float64, requires_grad=True)
    w = torch.randn(o, i, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SkinnyLinear.apply, (x, w))
    g = torch.randn(n, o, dtype=torch.float64)
    gx, gw = torch.autograd.grad(_SkinnyLinear.apply(x, w), (x, w), g)
    rx, rw = torch.autograd.grad(x @ w.t(), (x, w), g)
    assert torch.allclose(gx, rx) and torch.allclose(gw, rw)
    assert gw.is_contiguous()


def _attention(cls, heads=6, groups=2, hn=8):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=heads * hn, num_attention_heads=heads,
                            num_query_groups=groups, kv_channels=hn, attention_dropout=0.0,
                            masked_softmax_fusion=False, attention_softmax_in_fp32=True)
    return cls(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self").eval()


def test_sdpa_attention_matches_megatron_dot_product_attention():
    cpu_compat.apply()
    init_parallel(1)
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from backend.trainer.sdpa_attention import SDPAAttention

    ref, new = _attention(DotProductAttention), _attention(SDPAAttention)
    s, b, heads, groups, hn = 9, 2, 6, 2, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, heads, hn, generator=g, requires_grad=True)
    k = torch.randn(s, b, groups, hn, generator=g, requires_grad=True)
    v = torch.randn(s, b, groups, hn, generator=g, requires_grad=True)
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[1, :3] = True  # row 1 left-padded by 3
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
    mask = (causal[None] | pad[:, None, :])[:, None]  # [b, 1, s, s] True = masked
    mask &= ~(torch.eye(s, dtype=torch.bool)[None, None] & mask.all(-1, keepdim=True))  # padding queries see themselves
    for m in (None, mask):
        out_ref = ref(q, k, v, m)
        out_new = new(q, k, v, m)
        assert out_new.shape == (s, b, heads * hn)
        assert torch.allclose(out_new, out_ref, atol=1e-5), float((out_new - out_ref).abs().max())
        gr = torch.autograd.grad(out_ref.square().sum(), (q, k, v))
        gn = torch.autograd.grad(out_new.square().sum(), (q, k, v))
        assert all(torch.allclose(a, c, atol=1e-4) for a, c in zip(gr, gn))


def test_the_private_rendezvous_folder_is_removed_when_the_process_exits(tmp_path):
    # Every trainer process (the backend, each test worker) starts a world of one through a file store
    # in a fresh folder; before this was cleaned up, /tmp kept one empty folder per process.
    code = ("import glob, tempfile\n"
            "from backend.trainer.dist import init_parallel\n"
            "init_parallel(1)\n"
            "print(glob.glob(tempfile.gettempdir() + '/companion-dist-*')[0])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    folder = res.stdout.strip().splitlines()[-1]
    assert folder.startswith(str(tmp_path)) and "companion-dist-" in folder
    assert not os.path.exists(folder)
    assert not list(tmp_path.glob("companion-dist-*"))
