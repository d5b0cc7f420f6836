"""Token log-probs over vocab-parallel logits and the policy losses (PPO clip, KL, entropy, top-k OPD).

Contract:
- Logits arrive as Megatron produces them with ``parallel_output=True``:
  [b, s, v/tp], each TP rank holding a contiguous vocabulary slice. Every
  function here returns values identical on all TP ranks (reductions use
  megatron's ``reduce_from_tensor_model_parallel_region``: all-reduce forward,
  identity backward, which is the exact gradient because downstream values are
  replicated). At TP=1 they are plain log-softmax arithmetic.
- Masks select reply tokens only and may carry weights: every mean is sum(x * mask) / sum(mask)
  (the trainer passes 1 per token, or 1 / reply length to count each reply once).
- PPO: ratio = exp(logp - old), loss = -min(ratio*A, clip(ratio, 1-eps_low, 1+eps_high)*A).
- KL to base uses the k3 estimator exp(b-l) - (b-l) - 1 (>= 0, unbiased).
- Unlikelihood (Welleck et al. 2019): -log(1 - p) of chosen tokens, for tokens the person
  objected to by name; its gradient on the token's logit is p, where the policy gradient's is
  A * (1 - p), so it still bites on a word the model is sure of.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()


def _reduce(x: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x)


def log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the full (sharded) vocabulary: [b, s, v/tp] -> [b, s, 1]."""
    tp, _, group = _tp()
    m = logits.detach().max(dim=-1, keepdim=True).values  # [b, s, 1]
    if tp > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    sumexp = (logits - m).exp().sum(dim=-1, keepdim=True)
    return m + _reduce(sumexp).log()


def gather_logp(logits: torch.Tensor, logz: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log p of global token ids ``idx`` [b, s, k] -> [b, s, k]."""
    tp, rank, _ = _tp()
    vl = logits.shape[-1]
    local = idx - rank * vl
    inside = (local >= 0) & (local < vl)
    picked = logits.gather(-1, local.clamp(0, vl - 1)) * inside  # [b, s, k]
    return _reduce(picked) - logz


def token_logp(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False):
    """log p(targets) [b, s] (and the per-position entropy [b, s] when asked)."""
    logits = logits.float()
    logz = log_normalizer(logits)
    logp = gather_logp(logits, logz, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp, None
    lp = logits - logz  # [b, s, v/tp]
    ent = -_reduce((lp.exp() * lp).sum(-1))
    return logp, ent


def topk_global(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k (log-prob, global id) over the full vocabulary: [b, s, k] each."""
    tp, rank, group = _tp()
    logits = logits.float()
    logz = log_normalizer(logits)
    vals, idx = (logits - logz).topk(k, dim=-1)
    idx = idx + rank * logits.shape[-1]
    if tp > 1:
        all_v = [torch.empty_like(vals) for _ in range(tp)]
        all_i = [torch.empty_like(idx) for _ in range(tp)]
        dist.all_gather(all_v, vals.contiguous(), group=group)
        dist.all_gather(all_i, idx.contiguous(), group=group)
        cat_v, cat_i = torch.cat(all_v, -1), torch.cat(all_i, -1)
        vals, pos = cat_v.topk(k, dim=-1)
        idx = cat_i.gather(-1, pos)
    return vals, idx


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def ppo_loss(logp, old_logp, adv, mask, eps_low: float, eps_high: float):
    """Clipped surrogate, token mean over ``mask``; returns (loss, clip fraction)."""
    ratio = (logp - old_logp).exp()
    s1 = ratio * adv
    s2 = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    loss = masked_mean(-torch.minimum(s1, s2), mask)
    clipped = ((s2 < s1).float() * mask).sum() / mask.sum().clamp(min=1)
    return loss, float(clipped)


def unlikelihood(logp, mask):
    """Mean of -log(1 - p) over the tokens ``mask`` selects (0/1, [n]); p capped below 1 so it stays finite."""
    p = logp.exp().clamp(max=1 - 1e-6)
    return masked_mean(-torch.log1p(-p), mask)


def token_match(logp, teacher_logp, mask):
    """Mean over ``mask`` of the Bernoulli KL(p_T || p) of each sampled token ([n] log-probs): the policy's
    probability p of the token it wrote against the teacher's p_T. d/dlogit of the token = p - p_T: the
    gap alone sets the push, however sure the policy is (the PPO term's A (1 - p) fades as p -> 1),
    and it stops at the teacher's probability."""
    p = logp.exp().clamp(max=1 - 1e-6)
    pt = teacher_logp.exp().clamp(1e-6, 1 - 1e-6)
    kl = pt * (pt.log() - logp) + (1 - pt) * (torch.log1p(-pt) - torch.log1p(-p))
    return masked_mean(kl, mask)


def kl_k3(logp, base_logp, mask):
    d = base_logp - logp
    return masked_mean(d.exp() - d - 1, mask)


def topk_opd_loss(logits, logz, old_lp_k, teacher_lp_k, teacher_idx, mask, clip: float, eps_low: float, eps_high: float):
    """Top-k OPD: for each reply position, the teacher's top-k tokens each get the
    advantage clip(log p_T - log p_old, -clip, clip), weighted by the teacher's
    renormalised top-k probability, through the same PPO ratio clip. Tokens the
    teacher prefers more than the old policy are pushed up, the others down.
    Shapes: old_lp_k / teacher_lp_k / teacher_idx [b, s, k], mask [b, s]."""
    lp_k = gather_logp(logits, logz, teacher_idx)  # [b, s, k]
    adv = (teacher_lp_k - old_lp_k).clamp(-clip, clip)
    w = torch.softmax(teacher_lp_k, dim=-1)  # teacher mass renormalised over its top-k
    ratio = (lp_k - old_lp_k).exp()
    s = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    return masked_mean(-(w * s).sum(-1), mask)
