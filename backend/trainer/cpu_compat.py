"""CPU compatibility for megatron-core 0.16.1: the two CUDA-only assumptions it makes, patched.

Active only when no GPU is present (:func:`apply` is a no-op when
``torch.cuda.is_available()``), idempotent, and applied before any megatron
model is built. Nothing else in megatron-core needs changing on CPU; the
measured facts are in /work/shared/NOTES.md ("megatron-core 0.16.1 on CPU").

What it patches and why:

1. ``torch.cuda.current_device`` -> returns ``"cpu"``. About 40 call sites in
   megatron-core (rotary embeddings, attention buffers, parallel linears,
   GPTModel) pass ``device=torch.cuda.current_device()`` when they allocate a
   tensor; without a GPU that call raises. ``"cpu"`` is a valid ``device=``
   argument everywhere it is used that way. Outside megatron nobody calls it
   on a machine without CUDA (every library checks ``is_available()`` first).
2. The model-parallel RNG tracker (``megatron.core.tensor_parallel.random``)
   saves, swaps and restores the *CUDA* generator state around dropout and
   weight init. We route its get/set state helpers and ``CudaRNGStatesTracker.add``
   to the CPU generator, so ``model_parallel_cuda_manual_seed`` and
   ``tracker.fork()`` work with the same semantics (each named state is an
   independent stream; the caller's state is restored on exit).
3. ``get_default_causal_mask`` (megatron.core.transformer.utils, imported by
   name into megatron.core.fusions.fused_softmax) hard-codes ``device="cuda"``
   when attention is called without a mask; the patched version builds the same
   upper-triangular boolean mask on the CPU (cached per length, as upstream).
4. The two autograd functions behind every parallel linear
   (``LinearWithFrozenWeight``, ``LinearWithGradAccumulationAndAsyncCommunication``)
   are decorated with ``torch.amp.custom_fwd/custom_bwd(device_type="cuda")``, so
   under CPU bf16 autocast the backward runs without autocast and multiplies a
   bf16 gradient by an fp32 weight (dtype error). We re-decorate the undecorated
   functions (``__wrapped__``) with ``device_type="cpu"``: backward then runs
   under the same autocast state as forward, exactly what the CUDA path does.
5. ``LinearWithFrozenWeight`` (every base linear in LoRA mode, weight frozen) computes
   ``torch.matmul(x3d, W)`` on [s, b, in] activations. ``torch.matmul`` folds a 3-D x 2-D
   product into one GEMM only when the 2-D operand requires grad or the leading dims are
   viewable; for a frozen weight and activations/gradients whose size-1 batch dim has an
   odd stride (e.g. coming back through the residual stream or the output-layer transpose)
   it falls back to ``bmm`` with the weight *expanded* over the sequence: 256 GEMVs
   re-reading the weight. Measured on SmolLM2-135M, 1 x 256 tokens, 1 thread: 2.75 s of a
   6.8 s LoRA update (the 49k-vocab output-layer dgrad alone 1.48 s), which is why a full
   update (weight requires grad -> folded) beat the LoRA one. The patched forward/backward
   flatten to 2-D and call ``mm`` (same maths, one GEMM).
"""

from __future__ import annotations

import torch

_APPLIED = False


def needed() -> bool:
    return not torch.cuda.is_available()


def apply() -> bool:
    """Patch megatron-core for CPU when there is no GPU; returns True if patches are active."""
    global _APPLIED
    if _APPLIED:
        return True
    if not needed():
        return False
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]

    def _get_state(device="cuda", clone=False, graph_safe=False):  # noqa: ARG001 - megatron's signature
        return torch.get_rng_state()

    def _set_state(new_state, device=-1, graph_safe=False):  # noqa: ARG001
        torch.set_rng_state(new_state)

    def _add(self, name, seed):
        # Same bookkeeping as megatron's add(), on the CPU generator.
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as mutils

    @functools.lru_cache(maxsize=32)
    def _causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)  # [sq, sq], True = masked

    mutils.get_default_causal_mask = _causal_mask
    fused_softmax.get_default_causal_mask = _causal_mask

    from megatron.core.tensor_parallel import layers as mlayers

    for cls in (mlayers.LinearWithFrozenWeight, mlayers.LinearWithGradAccumulationAndAsyncCommunication):
        fwd = getattr(cls.forward, "__wrapped__", cls.forward)
        bwd = getattr(cls.backward, "__wrapped__", cls.backward)
        cls.forward = staticmethod(torch.amp.custom_fwd(fwd, device_type="cpu"))
        cls.backward = staticmethod(torch.amp.custom_bwd(bwd, device_type="cpu"))

    def _frozen_fwd(ctx, input, weight, bias, allreduce_dgrad, tp_group):
        ctx.save_for_backward(weight)
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.tp_group = tp_group
        output = input.reshape(-1, input.shape[-1]).mm(weight.t()).view(*input.shape[:-1], weight.shape[0])
        if bias is not None:
            output = output + bias
        return output

    def _frozen_bwd(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        grad_input = grad_output.reshape(-1, grad_output.shape[-1]).mm(weight)
        grad_input = grad_input.view(*grad_output.shape[:-1], weight.shape[1])
        if ctx.allreduce_dgrad:
            torch.distributed.all_reduce(grad_input, group=ctx.tp_group)
        return grad_input, None, None, None, None

    mlayers.LinearWithFrozenWeight.forward = staticmethod(torch.amp.custom_fwd(_frozen_fwd, device_type="cpu"))
    mlayers.LinearWithFrozenWeight.backward = staticmethod(torch.amp.custom_bwd(_frozen_bwd, device_type="cpu"))

    mrandom._get_cuda_rng_state = _get_state
    mrandom._set_cuda_rng_state = _set_state
    mrandom.CudaRNGStatesTracker.add = _add
    # model_parallel_cuda_manual_seed calls torch.cuda.manual_seed: harmless without CUDA
    # (torch queues it lazily), so it is left alone.
    _APPLIED = True
    return True
