"""The trainer: megatron-core GPTModel, binary RL + OPD under a PPO clip, LoRA or full, versioned.

Contract (the team interface):
- ``Trainer(cfg, model_path=..., checkpoint_dir=...)`` builds the policy from a HF
  Llama-family folder and resumes from the newest checkpoint in ``checkpoint_dir``.
  World size 1 in-process by default (gloo, private rendezvous); under torchrun
  every rank constructs a Trainer and calls the same methods with the same samples.
- ``update(samples)`` runs ``cfg.epochs`` PPO epochs over the batch, then, unless
  the repetition guard refuses it, increments ``version`` and checkpoints it
  *before* returning an :class:`UpdateReport`. An update the repetition guard
  refuses restores weights and optimizer state exactly and is still published as a
  new version (same weights as the previous one, ``accepted=False``), so every
  ``update()`` yields one checkpointed version and callers need no special case.
- ``export_delta()`` returns the current version as a :class:`backend.delta.Delta`
  (LoRA: absolute HF PEFT adapter; full: every weight in HF naming).

Learning rule per reply token t (A = advantage, old = log-probs recomputed here
before the update; the serving log-probs only feed ``train_serve_gap``):
  A_t = w_rl * (r - b) * [r != 0]  +  w_opd * (log p_teacher(a_t | s + hint) - old_t) * [hint]
(with ``opd_center`` the OPD term minus its mean over the reply's tokens)
with b the running reward baseline (``cfg.baseline``). Loss = PPO clip(A) +
kl_coef * KL_k3(policy || base) + entropy_coef * relu(entropy_floor - H). The PPO, OPD and
KL terms are averaged over each reply's tokens and then over the replies (``loss_agg="sample"``,
the default) or over all reply tokens of the minibatch (``"token"``); the entropy term is a
token mean. Top-k OPD (``opd_topk > 0``) replaces the token-level OPD term. Update v uses
lr / (1 + lr_decay * v). With ``teacher_replies`` ('self' | 'base') the batch also holds, for every hinted
sample, that model's own greedy reply to the hinted prompt, trained on the *unhinted* prompt with
A_t = w_teacher_reply (a :class:`TeacherReply`); it never enters the reward baseline. With
``replay_praised`` = k the batch also holds up to k earlier replies the judge rewarded +1 (newest
``replay_buffer`` kept, checkpointed; never one of the batch's own turns), each on its own prompt
with A_t = w_replay (a :class:`ReplayedReply`: self-imitation); nor do they enter the baseline.
With ``w_hindsight`` > 0 every judged +1 sample that carries ``hindsight_prompt_ids`` (a praised rewrite,
backend/hindsight.py) is also trained on that prompt with A_t = w_hindsight (a :class:`HindsightReply`).
With ``w_quoted`` > 0 the loss also has w_quoted * mean(-log(1 - p_t)) over the reply tokens where a
word the hint quotes starts (``Sample.quoted_positions``), per minibatch that has any.
With ``w_token_match`` > 0 it also has w_token_match * KL(Bernoulli(p_T) || Bernoulli(p)) of each sampled token of
a hinted reply (teacher's against the policy's probability of that token; same per-reply averaging as the PPO term).
With ``opd_rollouts`` = k the batch also holds up to k greedy replies the current policy writes (before the
update) to corrected prompts: the batch's hinted ones first, then a seeded pick of earlier ones (newest
``rollout_buffer`` kept, checkpointed). Each is a :class:`Rollout`: reward 0, so only the OPD term
(teacher = the policy with that prompt's hint) gives it advantage; it never enters the reward baseline.
With ``w_loops`` > 0 (the default) the current weights write greedy replies to ``loop_prompts`` training
prompts (one per conversation) and the loss of every optimizer step also has w_loops * mean(-log(1 - p_t))
over the tokens of n-grams those replies repeat (a :class:`LoopReplies`; nothing when they repeat nothing).
With ``loop_refresh`` 'epoch' the replies are written at the start of every epoch, to the batch's prompts:
the first epoch's by :meth:`Trainer.prepare` while the batch fills (the backend calls it when idle, with
the waiting samples), the later ones drafted from the previous epoch's (:meth:`Trainer.greedy_drafted`).
With 'update' they are written once per update, from the weights the update starts from, to the *previous*
batch's prompts (the first update after a start: its own), also by :meth:`Trainer.prepare`. Replies not
written ahead are written by the update itself, one prompt at a time as ahead, so timing never changes
what is learned.
With ``serve_ema`` = m > 0 the exported (served) weights are an average of the trained ones: after every accepted
update served <- m * served + (1 - m) * trained, from the initial weights (checkpointed); training, the guards,
the teacher and rollouts all use the trained weights. A refused update leaves the average as it was.
"""

from __future__ import annotations

import copy
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.samples import Sample
from backend.trainer import checkpoint as ckpt
from backend.trainer import loss as L
from backend.trainer.config import TrainerConfig
from backend.trainer.convert import LlamaShape, build_gpt_model, load_hf_state, load_into, to_megatron_shard
from backend.trainer.dist import init_parallel, tp_group, tp_rank, tp_size
from backend.trainer.lora import add_lora, lora_disabled, lora_parameters


class UpdateReport(dict):
    """A dict with attribute access (``report.version`` == ``report["version"]``)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def pooled_distinct_ngrams(replies: list[list[int]], n: int = 4) -> float:
    """Distinct n-grams over all n-grams, pooled across replies (1.0 when there are none): the
    replay's collapse measure on token ids. Low when replies loop *or* share stock phrases."""
    grams = [tuple(r[i : i + n]) for r in replies for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def distinct_conversations(prompts: list[list[int]]) -> list[list[int]]:
    """The prompts in order, without any that continue (or are continued by) one already kept.

    A rewrite request is the same conversation as the turn it follows, so its prompt starts with that
    turn's whole prompt; two such prompts make the variety probe compare near-duplicate replies (the
    teacher persona's first batch, docs/replay.md, Session 26: probe base 0.63 against 0.87)."""
    kept: list[list[int]] = []
    for p in prompts:
        if not any(p[: len(k)] == k or k[: len(p)] == p for k in kept):
            kept.append(p)
    return kept


def repeated_ngram_fraction(ids: list[int], n: int = 3) -> float:
    """Share of n-grams that repeat an earlier one (0 = no repetition, ->1 = a loop)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def repeated_ngram_positions(ids: list[int], n: int = 4) -> list[int]:
    """Positions of every token of each n-gram that repeats an earlier n-gram of ``ids`` (the first
    occurrence is not marked): the candidates of sequence-level unlikelihood (``w_loops``)."""
    seen: set[tuple[int, ...]] = set()
    marked: set[int] = set()
    for i in range(len(ids) - n + 1):
        g = tuple(ids[i : i + n])
        if g in seen:
            marked.update(range(i, i + n))
        seen.add(g)
    return sorted(marked)


DRAFT_TOKENS = 12  # drafted tokens per forward in greedy_drafted after a rejection (a 13-token forward costs
# about 1.5 single steps here); after a draft the model took whole, the next one may be twice as long
DRAFT_NGRAM = 3  # the reply's last tokens a draft is looked up by


def ngram_draft(reply: list[int], references: list[list[int]], k: int, n: int = DRAFT_NGRAM) -> list[int]:
    """Up to ``k`` tokens that followed ``reply``'s last ``n`` tokens elsewhere (prompt-lookup drafting):
    in a reference (the occurrence nearest the reply's own position: references are replies to the
    same prompt), else at the latest earlier occurrence in ``reply`` itself (a loop); [] if none. A reply
    shorter than ``n`` is looked up in the references by what it has (its start aligns with theirs)."""
    if k <= 0 or not reply:
        return []
    m = min(n, len(reply))
    key, here = reply[-m:], len(reply)
    best: tuple[int, list[int]] | None = None
    for ref in references:
        for i in range(len(ref) - m):
            if ref[i : i + m] == key and (best is None or abs(i + m - here) < best[0]):
                best = (abs(i + m - here), ref[i + m : i + m + k])
    if best is not None:
        return best[1]
    if len(reply) < n:
        return []
    for i in range(len(reply) - n - 1, -1, -1):
        if reply[i : i + n] == key:
            return reply[i + n : i + n + k]
    return []


@dataclass
class LoopReplies:
    """The loop term's greedy replies (``w_loops``): ``replies`` one per prompt (possibly empty), the
    (prompt, reply) ``pairs`` of the non-empty ones and a 0/1 ``mask`` [n_tok] over their packed reply
    tokens marking repeated n-grams. The term is 0 (and skipped) unless ``active``."""

    replies: list[list[int]]
    pairs: list[tuple[list[int], list[int]]]
    mask: torch.Tensor
    prepared: int = 0  # replies Trainer.prepare had written ahead

    @property
    def active(self) -> bool:
        return bool(self.mask.any())  # empty when no reply has a token


@dataclass
class TeacherReply(Sample):
    """A reply the policy or the base wrote, with the hint, for a hinted sample's prompt (``teacher_replies``):
    ``prompt_ids`` is the *unhinted* prompt, ``response_ids`` the teacher's reply ending in eos,
    and every token gets the fixed ``advantage``."""

    advantage: float = 0.0


@dataclass
class ReplayedReply(TeacherReply):
    """An earlier reply the judge rewarded +1, replayed in a later update (``replay_praised``): the
    served prompt and reply ids as they were, every token with the fixed ``advantage`` (``w_replay``)."""


@dataclass
class HindsightReply(TeacherReply):
    """A praised rewrite trained on the prompt of the criticised attempt it replaced (``w_hindsight``):
    ``prompt_ids`` is that earlier prompt, ``response_ids`` the praised reply's served ids."""


@dataclass
class Rollout(Sample):
    """The current policy's own greedy reply to a corrected prompt (``opd_rollouts``): ``prompt_ids`` the
    unhinted prompt, ``teacher_prompt_ids`` the same prompt with its hint, reward 0: trained by the OPD
    term alone, on-policy (the judged samples only ever score the reply the person criticised)."""


def _corrected_prompt(s: Sample) -> dict:
    """What a rollout needs of a hinted sample (``opd_rollouts``), as the checkpoint keeps it."""
    return {"turn_id": s.turn_id, "user": s.user, "prompt_ids": list(s.prompt_ids), "hint": s.hint,
            "teacher_prompt_ids": list(s.teacher_prompt_ids), "policy_version": s.policy_version}


class Trainer:
    def __init__(self, cfg: TrainerConfig | None = None, model_path: str | Path | None = None,
                 checkpoint_dir: str | Path | None = None):
        self.cfg = cfg = cfg or TrainerConfig()
        if model_path is None:
            from companion.config import load_settings
            from companion.models import resolve_model_path

            model_path = resolve_model_path(load_settings())
        self.model_path = Path(model_path)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        init_parallel(cfg.tp, cfg.seed)
        self.rank, self.tp = tp_rank(), tp_size()
        self.shape = LlamaShape.from_folder(self.model_path)
        self.model = build_gpt_model(self.shape, self.tp)
        load_into(self.model, to_megatron_shard(load_hf_state(self.model_path), self.shape, self.rank, self.tp))
        self._select: torch.Tensor | None = None  # [b, s] bool: positions whose logits are computed
        self._fp32_output_layer()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_id = self.tokenizer.eos_token_id
        self._base_state: dict[str, torch.Tensor] | None = None
        self._weight_swaps = 0  # full mode: how many times the base weights were swapped in (_base_ctx)
        if cfg.mode == "lora":
            for p in self.model.parameters():
                p.requires_grad_(False)
            add_lora(self.model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, self.rank, self.tp, cfg.seed)
            self.trainable = lora_parameters(self.model)
        else:
            self.trainable = {n: p for n, p in self.model.named_parameters()}
            self._check_full_delta_fits()
            if cfg.kl_coef > 0 or cfg.teacher == "base" or cfg.guard_variety_drop > 0:
                # A frozen copy of the base weights, swapped in for base-policy passes.
                self._base_state = self._trained_copy()
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(list(self.trainable.values()), lr=cfg.learning_rate,
                                             momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(
                list(self.trainable.values()), lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                weight_decay=cfg.weight_decay,
            )
        self.version, self.step, self.baseline, self.n_rewards = 0, 0, 0.0, 0
        self.model.eval()  # no dropout anywhere; eval() only affects module flags
        from companion.models import model_fingerprint

        self.fingerprint = model_fingerprint(self.model_path)
        self.resumed_from: int | None = None
        self._probe_prompts: list[list[int]] = []
        self._probe_rep: tuple[float, float] | None = None  # (repeat share, length) of the serving version
        self._variety_prompts: list[list[int]] = []  # the variety guard's probe prompts (fixed at first use)
        self._variety_base: float | None = None  # their pooled distinct-4 share under the frozen base
        self._praised: list[dict] = []  # newest replay_buffer praised replies: turn_id, user, prompt_ids, response_ids
        self._hinted: list[dict] = []  # newest rollout_buffer corrected prompts: turn_id, user, prompt_ids, teacher_prompt_ids, ...
        self._loop_prompts: list[list[int]] = []  # the loop term's prompts for the next update (the last batch's)
        # greedy replies of the current weights written ahead by prepare(): prompt -> reply, valid while
        # the version is _loop_written_at (nothing but update() changes the weights)
        self._loop_written: dict[tuple[int, ...], list[int]] = {}
        self._loop_written_at = -1
        # serve_ema: the average of the trained weights that is exported (None = export the trained weights)
        self._served: dict[str, torch.Tensor] | None = self._trained_copy() if cfg.serve_ema > 0 else None
        if self.checkpoint_dir is not None:
            self._resume()

    # ---- forward passes ---------------------------------------------------------------------

    def _check_full_delta_fits(self) -> None:
        """A full-mode delta is every weight in fp32 (absolute, so bf16 rounding would erase small
        updates); refuse at start a model whose delta the link would refuse at every update."""
        from companion.errors import UserError
        from companion.protocol import MAX_DELTA_BYTES

        n_bytes = sum(p.numel() for p in self.trainable.values()) * 4 * self.tp  # [TP-sharded -> whole]
        if n_bytes > MAX_DELTA_BYTES:
            raise UserError(f"mode 'full' would ship {n_bytes / 2**20:.0f} MiB per update, above the link's cap of "
                            f"{MAX_DELTA_BYTES / 2**20:.0f} MiB; use mode 'lora' for this model.")

    def _fp32_output_layer(self) -> None:
        """Run the vocabulary projection in fp32 even under bf16 autocast: the 49k-way
        log-softmax is where bf16 error hurts log-probs most (docs/trainer.md)."""
        layer = self.model.output_layer
        orig = layer.forward
        trainer = self

        def forward(input_, *args, **kwargs):
            # input_ [s, b, h]; with a position selector only the reply positions reach the
            # 49k-way projection (it is ~20% of the FLOPs and most of the memory): [N, 1, h].
            if trainer._select is not None:
                input_ = input_.transpose(0, 1)[trainer._select].unsqueeze(1)
            with torch.autocast("cpu", enabled=False):
                return orig(input_.float(), *args, **kwargs)

        layer.forward = forward

    def _autocast(self):
        if self.cfg.dtype == "bf16":
            return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
        return nullcontext()

    def _logits(self, ids: torch.Tensor, attention_mask=None, position_ids=None, select=None) -> torch.Tensor:
        """[b, s] -> vocab-parallel logits [b, s, v/tp] (fp32); with ``select`` [b, s] bool: [1, N, v/tp]."""
        if position_ids is None:
            position_ids = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        self._select = select
        try:
            with self._autocast():
                return self.model(ids, position_ids, attention_mask).float()
        finally:
            self._select = None

    def _base_ctx(self):
        """Context in which the model is the frozen base policy."""
        if self.cfg.mode == "lora":
            return lora_disabled(self.model)
        return self._holding(self._base_state)

    @contextmanager
    def _holding(self, weights: dict[str, torch.Tensor]):
        """Context in which the trainable parameters hold ``weights``; the trained ones come back on exit."""
        # The copies are in place: they invalidate any autograd graph built on the weights before,
        # so update() counts swaps and never backpropagates through one.
        self._weight_swaps += 1
        saved = self._trained_copy()
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(weights[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.trainable.items():
                    p.copy_(saved[n])

    def _collate(self, pairs: list[tuple[list[int], list[int]]]):
        """(prompt, reply) pairs -> right-padded ids [b, L], targets [b, L-1], reply mask [b, L-1]."""
        seqs, starts = [], []
        for prompt, reply in pairs:
            reply = reply[: self.cfg.max_tokens - 1]
            prompt = prompt[-(self.cfg.max_tokens - len(reply)) :] if len(prompt) + len(reply) > self.cfg.max_tokens else prompt
            seqs.append(prompt + reply)
            starts.append((len(prompt) - 1, len(reply)))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
        for i, (s, (p0, n)) in enumerate(zip(seqs, starts)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, p0 : p0 + n] = True
        return ids, ids[:, 1:], mask

    def _reply_logits(self, pairs):
        """Logits at reply positions only, flattened in (sample, token) order: [1, N, v/tp], targets [1, N]."""
        ids, tgt, mask = self._collate(pairs)
        select = torch.cat([mask, torch.zeros(mask.shape[0], 1, dtype=torch.bool)], dim=1)  # [b, L]
        logits = self._logits(ids, select=select)  # [1, N, v/tp], (sample, token) order
        return logits, tgt[mask].unsqueeze(0)

    @torch.no_grad()
    def _score(self, pairs, topk: int = 0):
        """Per-token log-probs of the replies [N] (and the top-k (logp, ids) [N, k] when asked)."""
        out_lp, out_k, out_i = [], [], []
        mb = self.cfg.minibatch_size
        for j in range(0, len(pairs), mb):
            logits, tgt = self._reply_logits(pairs[j : j + mb])
            lp, _ = L.token_logp(logits, tgt)
            out_lp.append(lp[0])
            if topk:
                v, i = L.topk_global(logits, topk)
                out_k.append(v[0])
                out_i.append(i[0])
        lp = torch.cat(out_lp)
        if topk:
            return lp, torch.cat(out_k), torch.cat(out_i)
        return lp, None, None

    def score(self, samples: list[Sample]) -> list[float]:
        """Mean log-prob of each sample's reply under the current policy (for probes and demos)."""
        lp, _, _ = self._score([(s.prompt_ids, s.response_ids) for s in samples])
        out, k = [], 0
        for s in samples:
            n = min(len(s.response_ids), self.cfg.max_tokens - 1)
            out.append(float(lp[k : k + n].mean()))
            k += n
        return out

    # ---- greedy probe (repetition guard) --------------------------------------------------------

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy replies, batched with left padding (no KV cache: probes are short)."""
        rows = [list(p) for p in prompts]
        done = [False] * len(rows)
        out: list[list[int]] = [[] for _ in rows]
        for _ in range(max_new_tokens):
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            pad = torch.zeros((len(rows), width), dtype=torch.bool)
            for i, r in enumerate(rows):
                ids[i, width - len(r) :] = torch.tensor(r)
                pad[i, : width - len(r)] = True
            pos = (~pad).long().cumsum(-1).sub(1).clamp(min=0)
            causal = torch.triu(torch.ones(width, width, dtype=torch.bool), 1)
            attn = (causal.unsqueeze(0) | pad.unsqueeze(1)).unsqueeze(1)  # [b, 1, s, s] True = masked
            attn &= ~torch.eye(width, dtype=torch.bool)  # a padding query sees itself: no all-masked row (NaN in SDPA)
            last = torch.zeros_like(pad)
            last[:, -1] = True
            logits = self._logits(ids, attn, pos, select=last).transpose(0, 1)  # [b, 1, v/tp]
            _, nxt = L.topk_global(logits, 1)  # [b, 1, 1]
            for i in range(len(rows)):
                if done[i]:
                    continue
                t = int(nxt[i, 0, 0])
                if t == self.eos_id:
                    done[i] = True
                    continue
                rows[i].append(t)
                out[i].append(t)
            if all(done):
                break
        return out

    @torch.no_grad()
    def _cached_step(self, ids: torch.Tensor, pos: torch.Tensor, cache: list, allowed: torch.Tensor,
                     every_position: bool = False) -> torch.Tensor:
        """Run ``ids`` [b, n] at positions ``pos`` [b, n] through the model, appending to the
        per-layer KV ``cache``; ``allowed`` [b, 1, n, T] (True = may attend, T = cached + n keys).
        Returns the vocab-parallel logits of the last position [b, v/tp] (fp32), or with
        ``every_position`` those of all n positions [n, b, v/tp].
        The same megatron modules (so TP and LoRA hooks apply) with a KV cache around attention."""
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        m = self.model
        with self._autocast():
            h = m.embedding(input_ids=ids, position_ids=pos)  # [n, b, hidden]
            freqs = m.rotary_pos_emb(int(pos.max()) + 1)[pos.t()].squeeze(2)  # [n, b, 1, d]
            for li, layer in enumerate(m.decoder.layers):
                att = layer.self_attention
                q, k, v = att.get_query_key_value_tensors(layer.input_layernorm(h))  # [n, b, heads, hn]
                q = apply_rotary_pos_emb(q, freqs, config=att.config)
                k = apply_rotary_pos_emb(k, freqs, config=att.config)
                if li == len(cache):
                    cache.append((k, v))
                else:
                    k, v = torch.cat([cache[li][0], k]), torch.cat([cache[li][1], v])
                    cache[li] = (k, v)
                o = att.core_attention(q, k, v, ~allowed)  # SDPAAttention: [n, b, np*hn]
                out, _ = att.linear_proj(o)
                h = h + out
                out, _ = layer.mlp(layer.pre_mlp_layernorm(h))
                h = h + out
            h = m.decoder.final_layernorm(h if every_position else h[-1:])  # [n or 1, b, hidden]
            w = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
            logits, _ = m.output_layer(h, weight=w)  # [n or 1, b, v/tp] (fp32, see _fp32_output_layer)
        return logits.float() if every_position else logits[0].float()

    @torch.no_grad()
    def greedy_cached(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy replies with a KV cache, all prompts in one left-padded batch: what :meth:`greedy`
        computes, with one prefill + one single-token step per new token (the weights are read
        once per step for the whole batch: the probe is memory-bound on them)."""
        rows = [list(p)[-(self.cfg.max_tokens - max_new_tokens) :] for p in prompts]
        if not rows:
            return []
        b, width = len(rows), max(len(r) for r in rows)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        valid = torch.zeros((b, width + max_new_tokens), dtype=torch.bool)  # key positions that are real
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            valid[i, width - len(r) : width] = True
        valid[:, width:] = True
        pos = (valid[:, :width].long().cumsum(-1) - 1).clamp(min=0)  # [b, width]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        allowed = causal[None] & valid[:, None, :width]  # [b, width, width]
        allowed |= torch.eye(width, dtype=torch.bool)[None]  # a padding query sees itself: no empty rows
        cache: list = []
        logits = self._cached_step(ids, pos, cache, allowed[:, None])
        out: list[list[int]] = [[] for _ in rows]
        done = [False] * b
        nxt_pos = pos[:, -1] + 1  # [b]
        for step in range(max_new_tokens):
            _, nxt = L.topk_global(logits.unsqueeze(1), 1)  # [b, 1, 1]
            toks = nxt[:, 0, 0]
            for i in range(b):
                if done[i]:
                    continue
                t = int(toks[i])
                if t == self.eos_id:
                    done[i] = True
                else:
                    out[i].append(t)
                    done[i] = len(out[i]) == max_new_tokens
            if all(done):
                break
            end = width + step + 1
            allowed_step = valid[:, None, None, :end]  # [b, 1, 1, T]
            logits = self._cached_step(toks.unsqueeze(1), nxt_pos.unsqueeze(1), cache, allowed_step)
            nxt_pos = nxt_pos + 1
        return out

    @torch.no_grad()
    def greedy_drafted(self, prompts: list[list[int]], max_new_tokens: int,
                       references: list[list[list[int]]] | None = None) -> list[list[int]]:
        """Greedy replies (what :meth:`greedy_cached` computes, up to rounding) with drafted tokens
        checked in one forward: prompt-lookup speculative decoding, one prompt at a time.

        Why: on this CPU a single-token step reads every weight for one product row; a forward of
        up to ~16 tokens costs about 1.5-2 single steps (docs/trainer.md), so every drafted token
        the model agrees with is nearly free. The draft after each forward is the up to
        ``DRAFT_TOKENS`` tokens that followed the reply's last ``DRAFT_NGRAM`` tokens elsewhere:
        in ``references[i]`` (earlier replies to prompt i, e.g. the one the previous epoch wrote,
        aligned nearest the current position; a sampled reply drafts poorly, docs/replay.md Session 30), else earlier in
        the reply itself (a loop repeats exactly what the lookup proposes). The first draft may be
        the whole rest of a reference (checked in one forward of ~prefill cost, it is all the work
        when the weights still write that reply), and a draft taken whole doubles the next one's
        length. The forward's argmax keeps the drafted tokens up to the first disagreement and adds
        its own next token, so every kept token is the model's greedy choice given the tokens before
        it; the KV cache drops the rejected ones. ``self.draft_stats`` counts (forwards, tokens) of
        the last call. One prompt at a time: rows would accept different numbers of tokens."""
        refs = references or [[] for _ in prompts]
        out, forwards, tokens = [], 0, 0
        for prompt, ref in zip(prompts, refs):
            reply, n = self._greedy_drafted_one(list(prompt)[-(self.cfg.max_tokens - max_new_tokens) :],
                                                max_new_tokens, [list(r) for r in ref])
            out.append(reply)
            forwards, tokens = forwards + n, tokens + len(reply)
        self.draft_stats = (forwards, tokens)
        return out

    def _greedy_drafted_one(self, prompt: list[int], max_new_tokens: int,
                            refs: list[list[int]]) -> tuple[list[int], int]:
        """(greedy reply, forwards run) for one prompt; see :meth:`greedy_drafted`."""
        n_p = len(prompt)
        causal = torch.ones(n_p, n_p, dtype=torch.bool).tril()[None, None]  # [1, 1, P, P]
        cache: list = []
        logits = self._cached_step(torch.tensor([prompt]), torch.arange(n_p)[None], cache, causal)  # [1, v/tp]
        forwards = 1
        _, nxt = L.topk_global(logits.unsqueeze(1), 1)  # [1, 1, 1]
        out = [int(nxt[0, 0, 0])]  # out[-1] is chosen but not yet in the cache
        span = max_new_tokens  # draft length: the whole rest of a reference at first
        while out[-1] != self.eos_id and len(out) < max_new_tokens:
            draft = ngram_draft(out, refs, min(span, max_new_tokens - len(out)), DRAFT_NGRAM)
            feed = [out[-1]] + draft  # [1 + d]
            cached = n_p + len(out) - 1
            n = len(feed)
            allowed = torch.ones(n, cached + n, dtype=torch.bool)
            allowed[:, cached:] = torch.ones(n, n, dtype=torch.bool).tril()
            logits = self._cached_step(torch.tensor([feed]), torch.arange(cached, cached + n)[None], cache,
                                       allowed[None, None], every_position=True)  # [n, 1, v/tp]
            forwards += 1
            _, best = L.topk_global(logits.transpose(0, 1), 1)  # [1, n, 1]
            best = best[0, :, 0].tolist()  # the greedy token after each fed token
            kept = 0
            while kept < len(draft) and draft[kept] == best[kept] and draft[kept] != self.eos_id:
                kept += 1
            out += draft[:kept] + [best[kept]]
            span = 2 * len(draft) if draft and kept == len(draft) else DRAFT_TOKENS
            # the cache now holds feed; the rejected drafted tokens' keys and values go
            keep = cached + 1 + kept
            for li, (k, v) in enumerate(cache):
                cache[li] = (k[:keep], v[:keep])
        out = out[:max_new_tokens]
        return (out[:-1] if out[-1] == self.eos_id else out), forwards

    def _repetition(self, prompts) -> tuple[float, float]:
        """(mean repeated-3-gram share, mean length) of greedy replies to the probe prompts."""
        replies = self.greedy_cached(prompts, self.cfg.guard_tokens)
        n = max(1, len(replies))
        return sum(repeated_ngram_fraction(r) for r in replies) / n, sum(len(r) for r in replies) / n

    def _variety(self) -> float:
        """Pooled distinct-4-gram share of greedy replies to the variety probe prompts."""
        return pooled_distinct_ngrams(self.greedy_cached(self._variety_prompts, self.cfg.guard_variety_tokens))

    # ---- the update -----------------------------------------------------------------------------

    def _clip_grads(self) -> float:
        """Global grad norm over TP (sharded grads summed across ranks, replicated counted once)."""
        import torch.distributed as dist

        sharded = torch.zeros(())
        replicated = torch.zeros(())
        for p in self.trainable.values():
            if p.grad is None:
                continue
            sq = p.grad.detach().float().pow(2).sum()
            if getattr(p, "tensor_model_parallel", False):
                sharded += sq
            else:
                replicated += sq
        if self.tp > 1:
            dist.all_reduce(sharded, group=tp_group())
        norm = float((sharded + replicated).sqrt())
        if self.cfg.grad_clip > 0 and norm > self.cfg.grad_clip:
            scale = self.cfg.grad_clip / (norm + 1e-6)
            for p in self.trainable.values():
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm

    def current_lr(self) -> float:
        """The learning rate of the next update (``lr_decay`` counts the versions made so far)."""
        return self.cfg.learning_rate / (1.0 + self.cfg.lr_decay * self.version)

    def _advantages(self, samples, old_lp, teacher_lp, b: float):
        """Per-token advantages [N] and the RL / OPD parts' means; ``b`` is the reward baseline."""
        cfg = self.cfg
        adv, rl_parts, opd_parts, k = [], [], [], 0
        for s in samples:
            n = min(len(s.response_ids), cfg.max_tokens - 1)
            a = torch.zeros(n)
            if isinstance(s, TeacherReply):
                a += s.advantage
            if s.reward != 0 and cfg.w_rl:
                a += cfg.w_rl * (s.reward - b)
                rl_parts.append(s.reward - b)
            if s.teacher_prompt_ids is not None and cfg.w_opd and teacher_lp is not None and not cfg.opd_topk:
                term = teacher_lp[k : k + n] - old_lp[k : k + n]
                opd_parts.append(float(term.mean()))  # reported before centring: how much the hint disliked the reply
                if cfg.opd_center:
                    term = term - term.mean()
                a += cfg.w_opd * term
            adv.append(a)
            k += n
        mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0  # noqa: E731
        return torch.cat(adv), mean(rl_parts), mean(opd_parts)

    def reward_baseline(self, samples=()) -> float:
        """The b of the RL advantage r - b for the next update of ``samples`` (see ``cfg.baseline``)."""
        cfg = self.cfg
        if cfg.baseline == "ema":
            return self.baseline
        if cfg.baseline == "mean":
            if self.n_rewards:
                # The EMA starts at 0, so after n rewards it carries weight m^n on that 0: divide it out.
                return self.baseline / (1.0 - cfg.baseline_momentum ** self.n_rewards)
            own = [s.reward for s in samples if s.reward != 0]  # the rewards _update_baseline counts
            return sum(own) / len(own) if own else 0.0
        return 0.0

    def _update_baseline(self, samples) -> None:
        m = self.cfg.baseline_momentum
        for s in samples:
            if s.reward != 0:
                self.baseline = m * self.baseline + (1 - m) * s.reward
                self.n_rewards += 1

    def teacher_reply_samples(self, samples: list[Sample]) -> list[TeacherReply]:
        """Greedy replies of the policy or the base (``teacher_replies``) to the hinted prompts of ``samples``.

        Dropped: a reply that does not end within ``teacher_reply_tokens`` (a cut reply would
        teach the policy not to stop), one whose repeated-3-gram share exceeds ``guard_max_repeat``
        (a loop), and one identical to the criticised reply (the hint changed nothing, so training
        towards it would reinforce what was criticised)."""
        cfg = self.cfg
        hinted = [s for s in samples if s.teacher_prompt_ids is not None]
        if not hinted:
            return []
        with (self._base_ctx() if cfg.teacher_replies == "base" else nullcontext()):
            replies = self.greedy_cached([s.teacher_prompt_ids for s in hinted], cfg.teacher_reply_tokens)
        out = []
        for s, r in zip(hinted, replies):
            criticised = [t for t in s.response_ids if t != self.eos_id]
            if not r or len(r) >= cfg.teacher_reply_tokens or r == criticised:
                continue
            if repeated_ngram_fraction(r) > cfg.guard_max_repeat:
                continue
            out.append(TeacherReply(
                turn_id=s.turn_id, user=s.user, prompt_ids=list(s.prompt_ids), response_ids=r + [self.eos_id],
                rollout_logprobs=None, reward=0, hint=None, teacher_prompt_ids=None,
                policy_version=s.policy_version, advantage=cfg.w_teacher_reply))
        return out

    def replay_samples(self, samples: list[Sample]) -> list[ReplayedReply]:
        """Up to ``replay_praised`` earlier praised replies for this update, none of them a turn of
        ``samples``; the pick is seeded by ``cfg.seed`` and the version, so a rerun replays the same."""
        cfg = self.cfg
        own = {s.turn_id for s in samples}
        pool = [p for p in self._praised if p["turn_id"] not in own]
        if not pool or cfg.replay_praised < 1 or cfg.w_replay <= 0:
            return []
        picked = random.Random(cfg.seed * 1_000_003 + self.version).sample(pool, min(cfg.replay_praised, len(pool)))
        return [ReplayedReply(turn_id=p["turn_id"], user=p["user"], prompt_ids=list(p["prompt_ids"]),
                              response_ids=list(p["response_ids"]), rollout_logprobs=None, reward=0, hint=None,
                              teacher_prompt_ids=None, policy_version=p["policy_version"], advantage=cfg.w_replay)
                for p in picked]

    def hindsight_samples(self, samples: list[Sample]) -> list[HindsightReply]:
        """For each praised sample of ``samples`` with a hindsight prompt, the same reply on that prompt."""
        if self.cfg.w_hindsight <= 0:
            return []
        return [HindsightReply(turn_id=s.turn_id, user=s.user, prompt_ids=list(s.hindsight_prompt_ids),
                               response_ids=list(s.response_ids), rollout_logprobs=None, reward=0, hint=None,
                               teacher_prompt_ids=None, policy_version=s.policy_version,
                               advantage=self.cfg.w_hindsight)
                for s in samples if s.reward == 1 and getattr(s, "hindsight_prompt_ids", None)]

    def rollout_samples(self, judged: list[Sample]) -> list[Rollout]:
        """Up to ``opd_rollouts`` greedy replies of the current weights to corrected prompts: the hinted
        samples of ``judged`` first, then earlier corrected prompts picked at random (seeded by
        ``cfg.seed`` and the version, so a rerun rolls out the same). Dropped: an empty reply and one
        whose repeated-3-gram share exceeds ``rollout_max_repeat`` (a loop: the hinted teacher copies
        it as readily as the policy, so the OPD term would not push it down). A reply that ended keeps
        its eos, so the teacher also judges stopping there."""
        cfg = self.cfg
        if cfg.opd_rollouts < 1 or cfg.w_opd <= 0:
            return []
        own = [_corrected_prompt(s) for s in judged if s.teacher_prompt_ids is not None]
        picked = own[: cfg.opd_rollouts]
        ids = {p["turn_id"] for p in own}
        pool = [p for p in self._hinted if p["turn_id"] not in ids]
        room = cfg.opd_rollouts - len(picked)
        if room > 0 and pool:
            picked += random.Random(cfg.seed * 1_000_033 + self.version).sample(pool, min(room, len(pool)))
        if not picked:
            return []
        replies = self.greedy_cached([list(p["prompt_ids"]) for p in picked], cfg.rollout_tokens)
        out = []
        for p, r in zip(picked, replies):
            if not r or repeated_ngram_fraction(r) > cfg.rollout_max_repeat:
                continue
            ended = len(r) < cfg.rollout_tokens
            out.append(Rollout(
                turn_id=p["turn_id"], user=p["user"], prompt_ids=list(p["prompt_ids"]),
                response_ids=r + ([self.eos_id] if ended else []), rollout_logprobs=None, reward=0,
                hint=p["hint"], teacher_prompt_ids=list(p["teacher_prompt_ids"]),
                policy_version=self.version))
        return out

    def _remember_hinted(self, samples: list[Sample]) -> None:
        """Keep the corrected prompts of the judged ``samples`` for later rollouts (newest ``rollout_buffer``)."""
        if not self.cfg.opd_rollouts:
            return
        seen = {p["turn_id"] for p in self._hinted}
        for s in samples:
            if s.teacher_prompt_ids is not None and s.turn_id not in seen:
                self._hinted.append(_corrected_prompt(s))
        del self._hinted[: max(0, len(self._hinted) - self.cfg.rollout_buffer)]

    def prepare(self, pending: list[Sample] = ()) -> bool:
        """Idle-time work for the next update, one piece per call; True if there was some. The backend
        calls it while no batch is ready, with the samples waiting for the next batch (oldest first).
        Today: one greedy reply of the loop term's first rollout (``w_loops``): to the previous batch's
        prompts ('update') or to the waiting samples' ('epoch', once they are known), from the current
        weights, which are the weights the next update starts from. The update uses what was written
        and writes the rest itself, the same way, so timing never changes what is learned."""
        cfg = self.cfg
        if cfg.w_loops <= 0:
            return False
        prompts = self._loop_prompts if cfg.loop_refresh == "update" else self._loop_prompts_of(list(pending))
        if self._loop_written_at != self.version:
            self._loop_written, self._loop_written_at = {}, self.version
        for p in prompts:
            if tuple(p) not in self._loop_written:
                self._loop_written[tuple(p)] = self._loop_reply(p)
                return True
        return False

    def _loop_prompts_of(self, judged: list[Sample]) -> list[list[int]]:
        """The loop term's prompts from a batch: the first ``loop_prompts``, one per conversation."""
        return distinct_conversations([list(s.prompt_ids) for s in judged])[: self.cfg.loop_prompts]

    def _loop_reply(self, prompt: list[int]) -> list[int]:
        """The current weights' greedy reply to one prompt, as the loop term's first rollout writes it (one
        prompt at a time, so a reply written ahead by :meth:`prepare` is the one the update would write)."""
        return self.greedy_cached([prompt], self.cfg.loop_tokens)[0]

    def loop_replies(self, prompts: list[list[int]], earlier: LoopReplies | None = None) -> LoopReplies:
        """The current weights' greedy replies to ``prompts`` with their repeated-n-gram tokens marked
        (``w_loops``); ``prepared`` counts those :meth:`prepare` had written. With ``earlier`` (replies of
        slightly older weights to the same prompts, e.g. the previous epoch's) they are decoded with
        those as drafts (:meth:`greedy_drafted`): the same greedy replies in fewer forwards while the
        weights have moved little."""
        cfg = self.cfg
        prepared = 0
        if earlier is not None:
            replies = self.greedy_drafted(prompts, cfg.loop_tokens, [[r] for r in earlier.replies])
        else:
            written = self._loop_written if self._loop_written_at == self.version else {}
            prepared = sum(tuple(p) in written for p in prompts)
            replies = [written[tuple(p)] if tuple(p) in written else self._loop_reply(p) for p in prompts]
        pairs, marks = [], []
        for p, r in zip(prompts, replies):
            r = r[: cfg.max_tokens - 1]  # the reply tokens the trainer's forward scores
            if not r:
                continue
            m = torch.zeros(len(r))  # [len(r)]
            m[repeated_ngram_positions(r, cfg.loop_ngram)] = 1.0
            pairs.append((list(p), r))
            marks.append(m)
        return LoopReplies(replies, pairs, torch.cat(marks) if marks else torch.zeros(0), prepared)

    def _remember_praised(self, samples: list[Sample]) -> None:
        """Keep the judged replies the judge rewarded +1 for later replay (newest ``replay_buffer``).
        ``samples`` are the batch's judged samples only: teacher-written and replayed ones come after them."""
        if not self.cfg.replay_praised:
            return
        seen = {p["turn_id"] for p in self._praised}
        for s in samples:
            if s.reward == 1 and s.turn_id not in seen:
                self._praised.append({"turn_id": s.turn_id, "user": s.user, "prompt_ids": list(s.prompt_ids),
                                      "response_ids": list(s.response_ids), "policy_version": s.policy_version})
        del self._praised[: max(0, len(self._praised) - self.cfg.replay_buffer)]

    def update(self, samples: list[Sample]) -> UpdateReport:
        """One policy update over ``samples``; checkpoints the new version before returning."""
        cfg = self.cfg
        t0 = time.perf_counter()
        samples = [s for s in samples if s is not None and s.response_ids]
        if not samples:
            return UpdateReport(version=self.version, accepted=False, reason="no samples", n_samples=0,
                                n_tokens=0, loss=0.0, seconds=0.0, train_serve_gap=None)
        n_judged = len(samples)
        t_teach = time.perf_counter()
        if cfg.teacher_replies != "off" and cfg.w_teacher_reply > 0:
            samples = samples + self.teacher_reply_samples(samples)
        teacher_reply_s = time.perf_counter() - t_teach
        judged = samples[:n_judged]
        replayed = self.replay_samples(judged)
        hindsight = self.hindsight_samples(judged)
        t_roll = time.perf_counter()
        rollouts = self.rollout_samples(judged)
        rollout_s = time.perf_counter() - t_roll
        samples = samples + replayed + hindsight + rollouts
        pairs = [(s.prompt_ids, s.response_ids) for s in samples]
        hinted = [i for i, s in enumerate(samples) if s.teacher_prompt_ids is not None]
        use_opd = bool(hinted) and (cfg.w_opd > 0 or cfg.w_token_match > 0)  # both need the teacher's log-probs
        # --- fixed quantities for this update: old / teacher / base log-probs
        # The first minibatch of the first epoch runs on exactly the weights the old log-probs are
        # defined on, so its (grad-enabled) forward doubles as their scoring pass: one forward of
        # that minibatch saved per update (the whole old-log-prob pass at the default batch size).
        mb = cfg.minibatch_size
        first_logits, first_tgt = self._reply_logits(pairs[:mb])
        first_lp, first_ent = L.token_logp(first_logits, first_tgt, with_entropy=True)
        swaps_at_first = self._weight_swaps  # a later base swap (full mode) voids this forward's graph
        old_lp = first_lp[0].detach()
        if len(pairs) > mb:
            old_lp = torch.cat([old_lp, self._score(pairs[mb:])[0]])
        lens = [min(len(s.response_ids), cfg.max_tokens - 1) for s in samples]
        offs = [sum(lens[:i]) for i in range(len(lens))]
        n_tok = sum(lens)
        teacher_lp = None
        teacher_tok = torch.zeros(n_tok)  # [n_tok] 1 on the tokens the teacher scored (hinted replies)
        topk_data = None
        if use_opd:
            tpairs = [(samples[i].teacher_prompt_ids, samples[i].response_ids) for i in hinted]
            with (self._base_ctx() if cfg.teacher == "base" else nullcontext()):
                t_lp, t_k, t_i = self._score(tpairs, topk=cfg.opd_topk)
            teacher_lp = old_lp.clone()  # unhinted tokens: teacher == old, OPD term 0
            if cfg.opd_topk:
                k = cfg.opd_topk
                tk = torch.zeros(n_tok, k)
                ti = torch.zeros(n_tok, k, dtype=torch.long)
            j = 0
            for i in hinted:
                sl = slice(offs[i], offs[i] + lens[i])
                teacher_lp[sl], teacher_tok[sl] = t_lp[j : j + lens[i]], 1.0
                if cfg.opd_topk:
                    tk[sl], ti[sl] = t_k[j : j + lens[i]], t_i[j : j + lens[i]]
                j += lens[i]
            if cfg.opd_topk:
                # the old policy's log-probs of the teacher's top-k tokens
                with torch.no_grad():
                    old_topk = torch.zeros(n_tok, cfg.opd_topk)
                    mb = cfg.minibatch_size
                    for a in range(0, len(samples), mb):
                        logits = first_logits.detach() if a == 0 else self._reply_logits(pairs[a : a + mb])[0]
                        s0, s1 = offs[a], offs[a] + sum(lens[a : a + mb])
                        logz = L.log_normalizer(logits)
                        old_topk[s0:s1] = L.gather_logp(logits, logz, ti[s0:s1].unsqueeze(0))[0]
                topk_data = (tk, ti, old_topk)
        base_lp = None
        if cfg.kl_coef > 0:
            with self._base_ctx():
                base_lp, _, _ = self._score(pairs)
        b_used = self.reward_baseline(samples)
        adv, rl_mean, opd_mean = self._advantages(samples, old_lp, teacher_lp, b_used)
        gap_parts = [
            (old_lp[offs[i] : offs[i] + lens[i]] - torch.tensor(s.rollout_logprobs[: lens[i]])).abs()
            for i, s in enumerate(samples) if s.rollout_logprobs and len(s.rollout_logprobs) >= lens[i]
        ]
        gap = float(torch.cat(gap_parts).mean()) if gap_parts else None
        # --- repetition guard reference and snapshot for an exact rollback
        # Probe prompts are fixed at the first update (and checkpointed) so the greedy repetition of
        # the serving version is computed once and reused: the guard costs one probe per update.
        if cfg.repetition_guard and not self._probe_prompts:
            self._probe_prompts = [list(s.prompt_ids) for s in samples[: cfg.guard_prompts]]
        guard_prompts = self._probe_prompts if cfg.repetition_guard else []
        guard_s = 0.0  # the repetition guard's greedy probes, reported separately (``guard_s``)
        if guard_prompts and self._probe_rep is None:
            tg = time.perf_counter()
            self._probe_rep = self._repetition(guard_prompts)
            guard_s += time.perf_counter() - tg
        rep_before, len_before = self._probe_rep if guard_prompts else (None, None)
        variety = cfg.guard_variety_drop > 0
        if variety and not self._variety_prompts:
            prompts = distinct_conversations([list(s.prompt_ids) for s in judged])
            self._variety_prompts = prompts[: cfg.guard_variety_prompts]
        if variety and self._variety_base is None:
            tg = time.perf_counter()
            with self._base_ctx():  # the base's figure, whatever version is serving when the guard is first used
                self._variety_base = self._variety()
            guard_s += time.perf_counter() - tg
        snapshot = None
        if guard_prompts or variety:
            snapshot = (self._trained_copy(), copy.deepcopy(self.optimizer.state_dict()))
        # --- PPO epochs
        for group in self.optimizer.param_groups:  # set every update: a guard rollback reloads the old groups
            group["lr"] = self.current_lr()
        # Per-token weights of the masked means: 1 for 'token' aggregation, 1/len(reply) for 'sample'
        # (masked_mean divides by the weights' sum, so each reply then counts once per minibatch).
        token_weights = torch.cat([torch.full((n,), 1.0 if cfg.loss_agg == "token" else 1.0 / n) for n in lens])  # [n_tok]
        quoted = torch.zeros(n_tok)  # [n_tok] 1 at the first token of each word the person quoted
        if cfg.w_quoted > 0:
            for i, s in enumerate(samples):
                for t in getattr(s, "quoted_positions", None) or ():
                    if t < lens[i]:
                        quoted[offs[i] + t] = 1.0
        n_quoted = int(quoted.sum())
        kl_weights = token_weights  # [n_tok]
        if base_lp is not None and not cfg.kl_eos:
            ends = torch.tensor([t == self.eos_id for s, n in zip(samples, lens) for t in s.response_ids[:n]])
            kl_weights = token_weights * (~ends)  # the anchor leaves the end token alone
        losses, clipfracs, kls, ents, norms = [], [], [], [], []
        loops, loop_s, loop_tokens, loop_terms = None, 0.0, [], []
        if cfg.w_loops > 0 and cfg.loop_refresh == "update":
            tl = time.perf_counter()
            loops = self.loop_replies(self._loop_prompts or self._loop_prompts_of(judged))
            loop_s += time.perf_counter() - tl
            loop_tokens.append(int(loops.mask.sum()))
        loop_prepared = loops.prepared if loops is not None else 0
        for _epoch in range(cfg.epochs):
            if cfg.w_loops > 0 and cfg.loop_refresh == "epoch":
                tl = time.perf_counter()
                # the loops of the weights this epoch starts from; after the first epoch drafted from
                # the previous epoch's replies (one or two optimizer steps change few greedy tokens)
                loops = self.loop_replies(self._loop_prompts_of(judged), earlier=loops)
                loop_s += time.perf_counter() - tl
                loop_tokens.append(int(loops.mask.sum()))
                loop_prepared += loops.prepared
            for a in range(0, len(samples), mb):
                s0, s1 = offs[a], offs[a] + sum(lens[a : a + mb])
                need_ent = cfg.entropy_floor > 0 and cfg.entropy_coef > 0
                if _epoch == 0 and a == 0 and self._weight_swaps == swaps_at_first:
                    # the forward already run for the old log-probs, on unchanged weights
                    logits, tgt, lp, ent = first_logits, first_tgt, first_lp, first_ent
                    first_logits = first_lp = first_ent = None
                else:
                    first_logits = first_lp = first_ent = None  # a stale graph, if any: free it
                    logits, tgt = self._reply_logits(pairs[a : a + mb])
                    lp, ent = L.token_logp(logits, tgt, with_entropy=True)  # entropy is also reported
                lp, ent = lp[0], ent[0]  # [n]
                mask = token_weights[s0:s1]
                loss, cf = L.ppo_loss(lp, old_lp[s0:s1], adv[s0:s1], mask, cfg.eps_low, cfg.eps_high)
                if topk_data is not None:
                    tk, ti, old_topk = topk_data
                    logz = L.log_normalizer(logits)
                    loss = loss + cfg.w_opd * L.topk_opd_loss(
                        logits, logz, old_topk[s0:s1].unsqueeze(0), tk[s0:s1].unsqueeze(0),
                        ti[s0:s1].unsqueeze(0), (teacher_tok[s0:s1] * mask).unsqueeze(0),
                        cfg.opd_topk_clip, cfg.eps_low, cfg.eps_high)
                if n_quoted and quoted[s0:s1].any():
                    loss = loss + cfg.w_quoted * L.unlikelihood(lp, quoted[s0:s1])
                if cfg.w_token_match > 0 and teacher_tok[s0:s1].any():
                    loss = loss + cfg.w_token_match * L.token_match(lp, teacher_lp[s0:s1], teacher_tok[s0:s1] * mask)
                if loops is not None and loops.active:
                    loop_logits, loop_tgt = self._reply_logits(loops.pairs)
                    loop_lp, _ = L.token_logp(loop_logits, loop_tgt)
                    term = L.unlikelihood(loop_lp[0], loops.mask)
                    loss = loss + cfg.w_loops * term
                    loop_terms.append(float(term.detach()))
                if base_lp is not None:
                    kl = L.kl_k3(lp, base_lp[s0:s1], kl_weights[s0:s1])
                    loss = loss + cfg.kl_coef * kl
                    kls.append(float(kl.detach()))
                mean_ent = ent.mean()
                if need_ent:
                    loss = loss + cfg.entropy_coef * torch.relu(cfg.entropy_floor - mean_ent)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norms.append(self._clip_grads())
                self.optimizer.step()
                self.step += 1
                losses.append(float(loss.detach()))
                clipfracs.append(cf)
                ents.append(float(mean_ent.detach()))
        report = UpdateReport(
            version=self.version, base_version=self.version, accepted=True, reason="",
            loss=sum(losses) / len(losses), loss_first=losses[0], loss_last=losses[-1],
            n_samples=n_judged, n_tokens=n_tok, n_hinted=sum(1 for i in hinted if i < n_judged),
            n_teacher_replies=len(samples) - n_judged - len(replayed) - len(hindsight) - len(rollouts),
            n_replayed=len(replayed), n_hindsight=len(hindsight), n_quoted=n_quoted, n_rollouts=len(rollouts),
            teacher_reply_s=teacher_reply_s, rollout_s=rollout_s,
            loop_s=loop_s, loop_prepared=loop_prepared, loop_tokens=loop_tokens,
            loop_term=(sum(loop_terms) / len(loop_terms)) if loop_terms else None,
            train_serve_gap=gap, clipfrac=sum(clipfracs) / len(clipfracs),
            kl=(sum(kls) / len(kls)) if kls else None, entropy=sum(ents) / len(ents),
            grad_norm=max(norms), baseline=b_used,
            rl_adv_mean=rl_mean, opd_adv_mean=opd_mean, rep_before=rep_before, rep_after=None,
            len_before=len_before, len_after=None, step=self.step,
            variety_base=self._variety_base if variety else None, variety_after=None,
        )
        why = ""
        if guard_prompts:
            tg = time.perf_counter()
            rep_after, len_after = self._repetition(guard_prompts)
            guard_s += time.perf_counter() - tg
            report.update(rep_after=rep_after, len_after=len_after)
            looping = rep_after > cfg.guard_max_repeat and rep_after > rep_before + 0.1
            # Measured collapse mode under constant -1 rewards: greedy replies shrink to nothing
            # (docs/trainer.md). Gradual shortening passes; halving in one update does not.
            shrinking = len_after < cfg.guard_min_len_ratio * len_before
            if looping or shrinking:
                why = (f"greedy repeat {rep_after:.2f} > {cfg.guard_max_repeat}" if looping
                       else f"greedy length {len_after:.1f} < {cfg.guard_min_len_ratio} x {len_before:.1f}")
        if variety and not why:
            tg = time.perf_counter()
            variety_after = self._variety()
            guard_s += time.perf_counter() - tg
            report.update(variety_after=variety_after)
            if variety_after < self._variety_base - cfg.guard_variety_drop:
                why = (f"greedy distinct-4 {variety_after:.2f} < base {self._variety_base:.2f} "
                       f"- {cfg.guard_variety_drop}")
        if why:
            with torch.no_grad():
                for n, p in self.trainable.items():
                    p.copy_(snapshot[0][n])
            self.optimizer.load_state_dict(snapshot[1])
            self.step -= len(losses)
            report.update(accepted=False, reason=f"repetition guard: {why}", step=self.step)
        elif guard_prompts:
            self._probe_rep = (rep_after, len_after)
        if report["accepted"]:
            self._update_baseline(samples)
            self._average_served()
        self._remember_praised(judged)  # the person's praise stands even when the guard refused the update
        self._remember_hinted(judged)  # as do their corrections
        if cfg.w_loops > 0 and cfg.loop_refresh == "update":  # the next update's prompts: prepare() writes meanwhile
            self._loop_prompts = self._loop_prompts_of(judged)
        self.version += 1
        report["version"] = self.version
        self._save()
        report["seconds"] = time.perf_counter() - t0
        report["guard_s"] = guard_s
        return report

    # ---- deltas and checkpoints -----------------------------------------------------------------

    def export_delta(self):
        """The current version as a weight delta (collective under TP)."""
        from backend.delta import Delta
        from backend.trainer.export import full_tensors, lora_tensors

        if self.version < 1:
            raise ValueError("nothing to export: no update has been made yet (version 0 is the base model)")
        meta = {"base_fingerprint": self.fingerprint, "base_model": str(self.model_path), "trainer_step": self.step}
        with self._served_weights():
            if self.cfg.mode == "lora":
                dtype = torch.bfloat16 if self.cfg.delta_dtype == "bf16" else torch.float32
                tensors = lora_tensors(self.model, self.shape, dtype)
                meta.update(lora_r=self.cfg.lora_rank, lora_alpha=self.cfg.lora_alpha, absolute="1")
                return Delta(self.version, self.version - 1, "lora", tensors, meta)
            tensors = full_tensors(self.model, self.shape)
            meta.update(absolute="1")
            return Delta(self.version, self.version - 1, "full", tensors, meta)

    def _trained_copy(self) -> dict[str, torch.Tensor]:
        """A detached copy of every trainable parameter (name -> tensor)."""
        return {n: p.detach().clone() for n, p in self.trainable.items()}

    def _average_served(self) -> None:
        """serve_ema: served <- m * served + (1 - m) * trained (after an accepted update)."""
        if self._served is None:
            return
        with torch.no_grad():
            for n, p in self.trainable.items():
                self._served[n].mul_(self.cfg.serve_ema).add_(p.detach(), alpha=1.0 - self.cfg.serve_ema)

    def _served_weights(self):
        """Context in which the model holds the weights it serves (the serve_ema average, else the trained)."""
        return nullcontext() if self._served is None else self._holding(self._served)

    def _state(self) -> dict:
        return {
            "trainable": self._trained_copy(), "served": self._served,
            "optimizer": self.optimizer.state_dict(),
            "version": self.version, "step": self.step, "baseline": self.baseline, "n_rewards": self.n_rewards,
            "probe_prompts": self._probe_prompts, "probe_rep": self._probe_rep, "praised": self._praised,
            "hinted": self._hinted, "loop_prompts": self._loop_prompts,
            "variety_prompts": self._variety_prompts, "variety_base": self._variety_base,
        }

    def _save(self) -> None:
        if self.checkpoint_dir is None:
            return
        from dataclasses import asdict

        meta = {"version": self.version, "step": self.step, "fingerprint": self.fingerprint,
                "tp": self.tp, "config": asdict(self.cfg)}
        ckpt.save(self.checkpoint_dir, self.version, self.rank, self._state(), meta, self.cfg.keep_checkpoints)

    def _resume(self) -> None:
        path = ckpt.latest(self.checkpoint_dir)
        if path is None:
            return
        state, meta = ckpt.load(path, self.rank)
        from companion.errors import UserError

        if meta.get("fingerprint") != self.fingerprint:
            raise UserError(f"checkpoint {path} was trained on another base model; use a fresh checkpoint folder.")
        # The optimizer's state only loads into the optimizer that wrote it (checkpoints from before
        # the option existed are AdamW's).
        saved_opt = meta["config"].get("optimizer", "adamw")
        if meta.get("tp") != self.tp or meta["config"]["mode"] != self.cfg.mode or saved_opt != self.cfg.optimizer:
            raise UserError(f"checkpoint {path} has TP={meta.get('tp')} mode={meta['config']['mode']} "
                            f"optimizer={saved_opt}; this trainer has TP={self.tp} mode={self.cfg.mode} "
                            f"optimizer={self.cfg.optimizer}.")
        missing = set(self.trainable) - set(state["trainable"])
        if missing:
            raise UserError(f"checkpoint {path} does not match the trainer's parameters (e.g. {sorted(missing)[0]}).")
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(state["trainable"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version, self.step = state["version"], state["step"]
        self.baseline, self.n_rewards = state["baseline"], state["n_rewards"]
        self._probe_prompts = state.get("probe_prompts") or []
        self._probe_rep = tuple(state["probe_rep"]) if state.get("probe_rep") else None
        self._praised = list(state.get("praised") or [])
        self._hinted = list(state.get("hinted") or [])
        self._loop_prompts = list(state.get("loop_prompts") or [])
        self._variety_prompts = state.get("variety_prompts") or []
        self._variety_base = state.get("variety_base")
        if self._served is not None:  # a checkpoint from before serve_ema was on starts its average here
            self._served = state.get("served") or self._trained_copy()
        self.resumed_from = self.version
