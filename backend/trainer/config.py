"""TrainerConfig: every knob of the learning rule, with help text and validation.

Defaults come from short measurements on this CPU (docs/trainer.md, "Stability"):
LoRA r8 on all linear layers, lr 3e-4, 2 epochs per update of 4 samples,
fp32 compute (bf16 GEMMs are slower on this CPU), reward centering with a running baseline,
a KL anchor to the base policy (0.2) and replay of the newest praised replies (2 of 4), both from the
persona replay (docs/replay.md, Sessions 10 and 11), a repetition guard, and the loop term (unlikelihood
on the repeated n-grams of the policy's own greedy replies, Sessions 28-30).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import MISSING, dataclass, field, fields

from backend.samples import HINT_PLACEMENTS
from companion.errors import UserError


SGD_LR = 1.0  # plain SGD at 1.0 moves the LoRA product about as far in the first update as AdamW at 3e-4 (docs/replay.md, Session 27)


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


class TrainerConfigError(UserError):
    """An invalid trainer setting (one sentence)."""


@dataclass
class TrainerConfig:
    mode: str = _help("'lora' (default: trains small adapters) or 'full' (all weights).", default="lora")
    lora_rank: int = _help("LoRA rank r.", default=8)
    lora_alpha: float = _help("LoRA alpha; the adapter output is scaled by alpha / r.", default=16.0)
    lora_targets: tuple[str, ...] = _help(
        "Megatron linears that get adapters: qkv, proj, fc1, fc2 (= HF q/k/v, o, gate/up, down).",
        default=("qkv", "proj", "fc1", "fc2"),
    )
    optimizer: str = _help(
        "'adamw' (default) or 'sgd' (SGD with 'momentum'). AdamW's first step moves every trainable element by "
        "about lr in the sign of its gradient, whatever the gradient's size, so a batch of weak signal (only "
        "criticism, a small OPD term) moves the weights as far as a strong one (docs/replay.md, Session 26); "
        "SGD moves them in proportion to the (clipped) gradient. Measured (docs/replay.md, Session 27): SGD "
        "ended the student at 0.462 and 0.615 against 0.769 and 0.615 with both runs losing variety (its "
        "gradient spikes 5-43x), and with baseline 'mean' it learned less (0.462, 0.231) and the teacher still "
        "lost variety. 'adamw' stays.", default="adamw")
    momentum: float = _help("Momentum of the 'sgd' optimizer (0 = plain SGD, the default: 0.9 at lr 1.0 diverged in the second update).", default=0.0)
    lr: float | None = _help("Learning rate; None = 3e-4 for LoRA, 1e-5 for full (AdamW), SGD_LR for 'sgd'.",
                             default=None)
    lr_decay: float = _help(
        "Learning-rate decay per update: update v (0, 1, ...) uses lr / (1 + lr_decay * v); 0 = constant. "
        "Damps later updates once the first corrections are learned, without ever stopping learning.", default=0.0)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    epochs: int = _help("Passes over each batch of samples per update (PPO epochs).", default=2)
    minibatch_size: int = _help("Samples per optimizer step within an epoch.", default=4)
    grad_clip: float = _help("Global gradient-norm clip (0 = off).", default=1.0)
    eps_low: float = _help("PPO clip below: ratio >= 1 - eps_low.", default=0.2)
    eps_high: float = _help("PPO clip above: ratio <= 1 + eps_high.", default=0.28)
    w_rl: float = _help("Weight of the binary-RL advantage (reward term).", default=1.0)
    w_opd: float = _help("Weight of the OPD advantage (teacher minus old log-prob).", default=1.0)
    teacher: str = _help("OPD teacher: 'self' (current policy + hint) or 'base' (frozen base + hint).", default="self")
    opd_center: bool = _help(
        "Centre the OPD term within each reply: A_t uses (log p_teacher - old)_t minus its mean over the reply's "
        "tokens. The hinted teacher finds the whole criticised reply less likely (-0.107 nats per token on student "
        "replies) and the words the hint is about more so (-0.406 on filler words, scripts/opd_credit.py); centring "
        "keeps only which tokens were worse than the rest. Off: on the student replay it lost the length signal that "
        "the reply-wide part carries (0.462 on seeds 0 and 1 against 0.769 / 0.615; docs/replay.md, Session 15).",
        default=False)
    opd_topk: int = _help("0 = token-level OPD on the sampled tokens; k > 0 = top-k OPD over the teacher's k best tokens.", default=0)
    opd_topk_clip: float = _help("Clip of the per-token log-ratio in top-k OPD.", default=2.0)
    teacher_replies: str = _help(
        "Hindsight distillation on a teacher-written reply: 'off', 'self' (the current policy with the hint writes "
        "it) or 'base' (the frozen base model with the hint: a fixed target that cannot drift with the policy). "
        "For every hinted sample that model writes a greedy reply to the hinted prompt, and the policy is trained "
        "towards it *without* the hint (a positive advantage 'w_teacher_reply' on each of its tokens, under the "
        "same PPO clip). OPD only re-scores the criticised reply; this shows the policy a reply written with the "
        "correction in mind. Replies that do not finish, loop or repeat the criticised reply are dropped.",
        default="off")
    w_teacher_reply: float = _help("Advantage of every token of a teacher-written reply (teacher_replies).", default=0.5)
    teacher_reply_tokens: int = _help("Longest teacher-written reply (tokens); one that does not end sooner is dropped.",
                                      default=160)
    replay_praised: int = _help(
        "Self-imitation: how many earlier replies the judge rewarded +1 are replayed in each update (0 = off). "
        "Each replayed reply is trained on its own prompt with the fixed advantage 'w_replay' on every token, "
        "under the same PPO clip; it never enters the reward baseline. Corrections only say what to move away "
        "from; replaying what the person liked keeps the policy near it while they push. Picked at random "
        "(seeded by 'seed' and the version) from the newest 'replay_buffer' praised replies, never one of the "
        "batch's own turns. Default 2 (0 until Session 11): with 'replay_buffer' 4 the student replay ended at "
        "all-pass 0.626 on seven seeds against 0.549 without, one seed at 0.923, none losing variety "
        "(docs/replay.md, Session 11).", default=2)
    replay_buffer: int = _help(
        "How many of the newest praised replies are kept for 'replay_praised' (checkpointed). 4: later praise "
        "is for shorter replies, and a buffer of 16 held the first, longest ones (docs/replay.md, Session 7).",
        default=4)
    w_replay: float = _help("Advantage of every token of a replayed praised reply ('replay_praised').", default=0.5)
    w_hindsight: float = _help(
        "Hindsight pairs (0 = off): a praised reply that rewrote a criticised one in the same conversation is also "
        "trained on the criticised attempt's prompt, with this fixed advantage on every token, in the same update "
        "(backend/hindsight.py). The criticised reply (-1) and the praised rewrite (+1) then meet on one prompt: "
        "the reply the person wanted, on the prompt they first asked. Never enters the reward baseline.",
        default=0.0)
    w_quoted: float = _help(
        "Weight of the quoted-word term (0 = off): when a complaint's hint quotes words the reply used "
        "(\"stop saying 'fundamental'\"), the first reply token of each such word gets the unlikelihood loss "
        "-log(1 - p), averaged over those tokens. The PPO term pushes a confident token down by about "
        "A * (1 - p) per unit of advantage, almost nothing for a word the model is sure of; this term pushes by "
        "about p. Only words the person quoted and the reply contains (backend.samples.quoted_positions).",
        default=0.0)
    w_token_match: float = _help(
        "Weight of the token-match term (0 = off): on every token of a hinted reply, the Bernoulli KL between the "
        "hinted teacher's probability p_T of that token and the policy's p, "
        "p_T log(p_T / p) + (1 - p_T) log((1 - p_T) / (1 - p)). Its gradient on the token's logit is p - p_T: "
        "a word the model is sure of (p 0.9) that the hint halves is pushed by 0.45, where the OPD term pushes by "
        "A (1 - p), about 0.07, and the push stops where p reaches the teacher's p_T (the OPD advantage stays "
        "fixed for the whole update). Sampled tokens only, unlike top-k OPD ('opd_topk'). Uses the teacher "
        "the OPD term uses ('teacher', 'hint_placement'). Off: on the student replay at 1.0 it ended lower over "
        "turns 24-36 (0.551 against 0.609 on eight paired seeds, SE 0.021) without fewer filler words (docs/replay.md, "
        "Session 23).", default=0.0)
    opd_rollouts: int = _help(
        "On-policy OPD rollouts (0 = off): in every update the current policy writes up to this many greedy "
        "replies (before the update, at most 'rollout_tokens' tokens) to prompts that were corrected: the batch's "
        "hinted prompts first, then a seeded pick of earlier ones (the newest 'rollout_buffer' kept, "
        "checkpointed). Each reply is trained with the OPD term only: the teacher (the policy with that prompt's "
        "hint) scores the policy's own reply, token by token, on the unhinted prompt; no reward, never in the "
        "baseline. The judged samples only ever score the reply that was criticised, once; a rollout asks what "
        "the policy would say *now*, so a correction keeps teaching after the weights have moved. Empty and "
        "looping replies (repeated-3-gram share above 'rollout_max_repeat') are dropped.", default=0)
    rollout_tokens: int = _help("Longest on-policy rollout (tokens); one that does not end is kept, cut, without eos.",
                                default=96)
    rollout_max_repeat: float = _help(
        "Drop an on-policy rollout whose repeated-3-gram share exceeds this (a loop). Stricter than the guard's "
        "'guard_max_repeat' is useful: the hinted teacher predicts a loop's continuation as readily as the policy "
        "(in-context copying), so the OPD term does not push a loop down and can push it up.", default=0.5)
    rollout_buffer: int = _help("How many of the newest corrected prompts (with their hints) 'opd_rollouts' draws "
                                "from after the batch's own (checkpointed).", default=8)
    w_loops: float = _help(
        "Weight of the loop term (0 = off; on since Session 30): the current weights write greedy replies (at most 'loop_tokens' "
        "tokens) to 'loop_prompts' training prompts, one per conversation, when 'loop_refresh' says, and every "
        "token of an n-gram ('loop_ngram') that repeats an earlier one in the same reply "
        "gets the unlikelihood loss -log(1 - p), averaged over those tokens (sequence-level unlikelihood, "
        "Welleck et al. 2019). The replay's evaluations are greedy and its collapse is greedy replies falling "
        "into loops once learning moves the weights (docs/replay.md, Session 27 section 4: random moves of the "
        "same size keep their variety, the learned one does not); this term pushes against the loops the "
        "current weights actually write, on the training prompts. Replies that repeat nothing add nothing. "
        "Student replay, eight paired seeds: all-pass 0.760 at turn 36 against 0.615 without it (Session 28), "
        "at 1.08x the replay's wall since Session 30 (docs/replay.md).",
        default=1.0)
    loop_refresh: str = _help(
        "When the loop term writes its replies: 'epoch' (at the start of every epoch, to the batch's prompts: "
        "Session 28's measured gain; the first epoch's replies are written by Trainer.prepare while the batch "
        "fills, the next epochs' drafted from the previous epoch's: 1.08x the replay's wall, Session 30) or "
        "'update' (once per update, from the weights it starts from, to the previous batch's prompts, written "
        "ahead the same way: no gain on the student, docs/replay.md, Session 29).",
        default="epoch")
    loop_prompts: int = _help("Prompts the loop term ('w_loops') writes a greedy reply to each time.", default=2)
    loop_tokens: int = _help("Longest greedy reply of the loop term (tokens); the replay evaluates 160.", default=160)
    loop_ngram: int = _help("The loop term marks tokens of repeated n-grams of this length (distinct-4 is the "
                            "replay's collapse measure).", default=4)
    hint_memory: int = _help(
        "Hint memory of the OPD teacher (0 = off): the teacher of every judged sample of an update sees the "
        "user's newest N distinct hints (the judge's, oldest first), not only the hint of that turn "
        "('hint_memory_scope' says which samples). Without it a "
        "correction about length says nothing about filler words, and the later updates trade one preference "
        "against the other (docs/replay.md, Session 16, section 5). The hints only ever reach the teacher's "
        "prompt, never the policy's: the policy learns them through its weights. Applied by the backend "
        "(backend/loops.py), which keeps the hints.",
        default=0)
    hint_memory_scope: str = _help(
        "Which samples 'hint_memory' gives the remembered hints: 'hinted' (only those with a hint of their own: "
        "the OPD term keeps its samples and gains the earlier corrections) or 'all' (a praised reply or a vague "
        "complaint gets the OPD term too).", default="hinted")
    hint_placement: str = _help(
        "Where the OPD teacher sees the hint: 'user' (appended to the last user message, the paper's way) or "
        "'system' (a standing instruction at the end of the system message). Only the teacher's prompt changes; "
        "applied by the sample stage (backend/stages.py). The hinted base model meets every student preference "
        "in 0.288 of its replies with 'system' against 0.197 with 'user' (scripts/hint_adherence.py), but the "
        "student replay does not learn more from it: 0.571 against 0.609 over turns 24-36 on eight paired seeds, "
        "behind on five (docs/replay.md, Session 21). Kept as an option, off.", default="user")
    loss_agg: str = _help(
        "How token losses are averaged: 'token' (every reply token of a minibatch weighs the same, so long "
        "replies dominate) or 'sample' (each reply's tokens are averaged first, then the replies: a short "
        "praised reply counts as much as a long criticised one). 'sample' is the default: on the student replay "
        "it ended at all-pass 0.615 on average over 3 seeds against 0.462 for 'token', with less repetition "
        "(docs/replay.md, Session 4).", default="sample")
    serve_ema: float = _help(
        "Serve an average of the trained weights (0 = off): after every accepted update the served weights "
        "become serve_ema * served + (1 - serve_ema) * trained, starting from the base, and only they are "
        "exported; training continues from the trained weights (Polyak averaging of the iterates). Aimed at "
        "the student replay's swings between evaluations and its transient greedy loops. Measured "
        "(docs/replay.md, Session 22): 0.5 alone is slower (seeds 0 and 1: 0.462 and 0.462 against 0.615 and "
        "0.769); 0.5 with lr 6e-4 is the default again (0.567 against 0.587 on eight paired seeds; lr 6e-4 alone "
        "0.510, two seeds collapsed). Kept as an option, off. LoRA averages each factor, which "
        "matches averaging the product B A up to second-order terms while the factors move little per update.",
        default=0.0)
    baseline: str = _help(
        "Reward centering: 'ema' (running mean of rewards subtracted, started at 0), 'mean' (the same "
        "running mean corrected for its start at 0, as Adam corrects its moments: ema / (1 - momentum^n) "
        "after n rewards; before any reward, the mean of the batch's own rewards), or 'none'. With 'ema' "
        "the first updates of a person who never praises (the teacher persona: 0 praise in 24 turns) "
        "push every sampled reply down at nearly full strength, which 'mean' does not. Measured (docs/replay.md, "
        "Session 26): 'mean' did not stop the teacher's loss of variety (binary alone and OPD alone lose it too) and slowed the "
        "student's 'short' (0.538 against 0.641 on seeds 0-2); 'none' 0.615 against 0.692 on seeds 0-1. 'ema' stays.",
        default="ema")
    baseline_momentum: float = _help("EMA momentum of the reward baseline, per sample.", default=0.9)
    kl_coef: float = _help(
        "Weight of the KL(k3) anchor to the base policy (0 = off). 0.2 (was 0.05 until Session 11): with chat "
        "replies sampled at 0.5 it ended the student replay at all-pass 0.549 on seven seeds against 0.429, "
        "never below on a seed, and no run lost variety (docs/replay.md, Session 10). 0.5 (with lr 6e-4) kept every "
        "run's variety but held the replies long: 0.506 against 0.609 over turns 24-36 (Session 23).", default=0.2)
    kl_eos: bool = _help(
        "Take the KL anchor at the end-of-reply token too (default). False leaves the decision to stop to the "
        "other terms: the base ends its replies late, so a policy that learned to stop early pays the anchor "
        "at its end token (with base probability 0.01 against 0.5, k3 is about 2.9 nats there against a few "
        "hundredths elsewhere), and the anchor pulls replies back towards the base's length. Off, replies get "
        "shorter and answer less: all-pass within one SE of the default and more collapse misses (docs/replay.md, "
        "Sessions 24-25).", default=True)
    entropy_floor: float = _help("Mean reply-token entropy (nats) below which a penalty applies (0 = off).", default=0.3)
    entropy_coef: float = _help("Weight of the entropy-floor penalty.", default=0.1)
    repetition_guard: bool = _help("Refuse an update whose greedy replies on probe prompts become repetitive.", default=True)
    guard_prompts: int = _help("Probe prompts for the repetition guard (taken from the batch).", default=2)
    guard_tokens: int = _help("Greedy tokens generated per probe prompt.", default=24)
    guard_max_repeat: float = _help("Refuse when the repeated-3-gram fraction exceeds this and got worse.", default=0.5)
    guard_min_len_ratio: float = _help("Refuse when the mean greedy probe length falls below this share of the previous version's (0 = off).", default=0.5)
    guard_variety_drop: float = _help(
        "Variety guard (0 = off): refuse an update when the distinct-4-gram share of the greedy replies to "
        "'guard_variety_prompts' probe prompts, pooled across the replies, falls more than this below the frozen "
        "base model's on the same prompts. The replay's collapse measure, on training prompts: the short, "
        "per-reply repetition probe above missed the stock phrases and late loops that ended two student "
        "replays in Session 8 (docs/replay.md, Session 9).", default=0.0)
    guard_variety_prompts: int = _help(
        "Probe prompts for the variety guard: the first update's first samples, one per conversation (a rewrite "
        "request's prompt continues the turn it follows; both would compare near-duplicate replies).", default=4)
    guard_variety_tokens: int = _help("Greedy tokens generated per variety probe prompt.", default=64)
    dtype: str = _help(
        "Training compute: 'fp32' (default: this CPU has no native bf16 GEMM, bf16 measured ~7x slower) "
        "or 'bf16' autocast (fp32 master weights and fp32 vocabulary projection; for GPUs / AMX CPUs).",
        default="fp32",
    )
    delta_dtype: str = _help("Dtype of exported LoRA factors: 'bf16' (half size) or 'fp32' (exact).", default="bf16")
    tp: int = _help("Tensor-parallel degree (world size under torchrun).", default=1)
    threads: int = _help("Torch threads for training; 0 leaves the process setting alone (share cores with serving).", default=0)
    seed: int = _help("Seed for adapter init and megatron's RNG tracker.", default=1234)
    keep_checkpoints: int = _help("How many versions to keep on disk (the newest ones).", default=3)
    max_tokens: int = _help("Longest prompt+reply sequence trained on (longer samples keep their tail).", default=2048)

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)
        checks = [
            (self.mode in ("lora", "full"), f"mode must be 'lora' or 'full', not {self.mode!r}."),
            (self.lora_rank >= 1, "lora_rank must be at least 1."),
            (self.lora_alpha > 0, "lora_alpha must be positive."),
            (all(t in ("qkv", "proj", "fc1", "fc2", "o", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
                 for t in self.lora_targets) and self.lora_targets, "lora_targets must be among qkv, proj, fc1, fc2."),
            (self.lr is None or self.lr > 0, "lr must be positive."),
            (self.lr_decay >= 0, "lr_decay must be >= 0."),
            (self.optimizer in ("adamw", "sgd"), f"optimizer must be 'adamw' or 'sgd', not {self.optimizer!r}."),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)."),
            (self.epochs >= 1 and self.minibatch_size >= 1, "epochs and minibatch_size must be at least 1."),
            (0 <= self.eps_low < 1 and self.eps_high >= 0, "eps_low must be in [0, 1) and eps_high non-negative."),
            (self.teacher in ("self", "base"), "teacher must be 'self' or 'base'."),
            (self.opd_topk >= 0, "opd_topk must be 0 (off) or positive."),
            (self.teacher_replies in ("off", "self", "base"), "teacher_replies must be 'off', 'self' or 'base'."),
            (self.w_teacher_reply >= 0 and self.teacher_reply_tokens >= 1,
             "w_teacher_reply must be >= 0 and teacher_reply_tokens at least 1."),
            (self.replay_praised >= 0 and self.replay_buffer >= 1 and self.w_replay >= 0,
             "replay_praised must be >= 0, replay_buffer at least 1 and w_replay >= 0."),
            (self.w_hindsight >= 0, "w_hindsight must be >= 0."),
            (self.w_quoted >= 0, "w_quoted must be >= 0."),
            (self.w_token_match >= 0, "w_token_match must be >= 0."),
            (self.w_loops >= 0 and self.loop_prompts >= 1 and self.loop_tokens >= 4 and self.loop_ngram >= 1,
             "w_loops must be >= 0, loop_prompts and loop_ngram at least 1, loop_tokens at least 4."),
            (self.hint_memory >= 0, "hint_memory must be 0 (off) or positive."),
            (self.opd_rollouts >= 0 and self.rollout_tokens >= 1 and self.rollout_buffer >= 1,
             "opd_rollouts must be >= 0, rollout_tokens and rollout_buffer at least 1."),
            (0 <= self.rollout_max_repeat <= 1, "rollout_max_repeat must be in [0, 1]."),
            (self.hint_memory_scope in ("hinted", "all"), "hint_memory_scope must be 'hinted' or 'all'."),
            (self.hint_placement in HINT_PLACEMENTS,
             "hint_placement must be " + " or ".join(repr(p) for p in HINT_PLACEMENTS) + "."),
            (self.loss_agg in ("token", "sample"), "loss_agg must be 'token' or 'sample'."),
            (self.loop_refresh in ("epoch", "update"), "loop_refresh must be 'epoch' or 'update'."),
            (self.baseline in ("ema", "mean", "none"), "baseline must be 'ema', 'mean' or 'none'."),
            (0 <= self.baseline_momentum < 1, "baseline_momentum must be in [0, 1)."),
            (0 <= self.serve_ema < 1, "serve_ema must be in [0, 1)."),
            (self.kl_coef >= 0 and self.entropy_coef >= 0 and self.entropy_floor >= 0, "kl_coef, entropy_coef and entropy_floor must be >= 0."),
            (self.dtype in ("bf16", "fp32"), "dtype must be 'bf16' or 'fp32'."),
            (self.delta_dtype in ("bf16", "fp32"), "delta_dtype must be 'bf16' or 'fp32'."),
            (self.tp >= 1, "tp must be at least 1."),
            (self.threads >= 0, "threads must be 0 (unchanged) or positive."),
            (0 <= self.guard_min_len_ratio < 1, "guard_min_len_ratio must be in [0, 1)."),
            (0 <= self.guard_variety_drop < 1, "guard_variety_drop must be in [0, 1)."),
            (self.guard_variety_prompts >= 1 and self.guard_variety_tokens >= 4,
             "guard_variety_prompts must be at least 1 and guard_variety_tokens at least 4."),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be at least 1."),
            (self.max_tokens >= 8, "max_tokens must be at least 8."),
        ]
        for ok, msg in checks:
            if not ok:
                raise TrainerConfigError(msg)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.optimizer == "sgd":
            return SGD_LR
        return 3e-4 if self.mode == "lora" else 1e-5


def config_from_overrides(overrides: dict) -> TrainerConfig:
    """A :class:`TrainerConfig` from JSON overrides (``--trainer`` / ``--trainer-json``), checked up front.

    Raises :class:`TrainerConfigError` in one sentence for an unknown field (with the closest name),
    a value of the wrong type (judged by the field's default: a number for a float, a whole number
    for an int, true/false for a bool, text for a str, a list of text for a tuple) or one
    ``__post_init__`` refuses. Without this a misspelt field surfaced only at the first update, in
    the backend's log, minutes into a replay."""
    known = {f.name: f for f in fields(TrainerConfig)}
    out = {}
    for name, value in overrides.items():
        f = known.get(name)
        if f is None:
            close = difflib.get_close_matches(str(name), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TrainerConfigError(f"unknown trainer setting {name!r}{hint}.")
        default = f.default if f.default is not MISSING else f.default_factory()
        is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        elif isinstance(default, float) or default is None:  # None: lr, a number or null
            ok, kind = is_num or (default is None and value is None), "a number" + (" or null" if default is None else "")
            value = float(value) if is_num else value
        elif isinstance(default, str):
            ok, kind = isinstance(value, str), "text"
        else:  # a tuple: lora_targets
            ok, kind = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value), "a list of names"
            value = tuple(value) if ok else value
        if not ok:
            raise TrainerConfigError(f"trainer setting {name!r} must be {kind}, not {json.dumps(value, default=str)}.")
        out[name] = value
    return TrainerConfig(**out)
