"""Trainer on a tiny random Llama (TP=1, in-process): learning directions, deltas, resume, guard, config."""

from __future__ import annotations

import copy

import pytest
import torch

from backend.delta import pack, save_peft_adapter, unpack
from backend.samples import Sample
from backend.trainer import Trainer, TrainerConfig
from backend.trainer.tp_check import fixed_samples, full_logits
from companion.errors import UserError

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

QUIET = dict(repetition_guard=False, kl_coef=0.0, entropy_floor=0.0, lora_rank=4, epochs=1, replay_praised=0, w_loops=0.0)


def cfg(**kw) -> TrainerConfig:
    return TrainerConfig(**{**QUIET, **kw})


def mean_logp(tr: Trainer, s: Sample) -> float:
    return tr.score([s])[0]


def prompt_ids(tr: Trainer, text: str = "What is the capital of France?") -> list[int]:
    return tr.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]


def rewarded(tr: Trainer, reward: int) -> Sample:
    s = fixed_samples(tr.tokenizer)[0]
    return Sample(s.turn_id, s.user, s.prompt_ids, s.response_ids, None, reward, None, None, 0)


def test_binary_rl_pushes_rewarded_up_and_punished_down(tiny_model_dir):
    tr = Trainer(cfg(lr=3e-3), model_path=tiny_model_dir)
    up, down = fixed_samples(tr.tokenizer)
    up = Sample(**{**up.to_dict(), "reward": 1})
    down = Sample(**{**down.to_dict(), "reward": -1, "hint": None, "teacher_prompt_ids": None})
    before = tr.score([up, down])
    for _ in range(3):
        rep = tr.update([up, down])
    after = tr.score([up, down])
    assert after[0] > before[0] + 0.05
    assert after[1] < before[1] - 0.05
    assert rep.version == 3 and rep.accepted and rep.n_samples == 2
    assert rep.n_tokens == len(up.response_ids) + len(down.response_ids)


def test_opd_moves_the_policy_toward_the_hinted_teacher(tiny_model_dir):
    tr = Trainer(cfg(lr=3e-4, teacher="base", w_rl=0.0), model_path=tiny_model_dir)
    s = fixed_samples(tr.tokenizer)[1]  # reward -1 with a hint; w_rl=0 isolates OPD
    pairs = [(s.prompt_ids, s.response_ids)]
    teacher, _, _ = tr._score([(s.teacher_prompt_ids, s.response_ids)])
    old, _, _ = tr._score(pairs)
    rep = tr.update([s])
    new, _, _ = tr._score(pairs)
    adv = teacher - old
    assert float(adv.abs().mean()) > 1e-3
    # tokens the teacher prefers went up, the others down: positive alignment of the change with A_t
    assert float(((new - old) * adv).sum()) > 0
    assert float((teacher - new).abs().mean()) < float(adv.abs().mean())
    assert rep.n_hinted == 1 and rep.opd_adv_mean == pytest.approx(float(adv.mean()), abs=1e-5)


def test_centred_opd_keeps_only_which_tokens_the_teacher_disliked_more(tiny_model_dir):
    # opd_center: the OPD term minus its mean over the reply. With w_rl = 0 the first loss
    # (ratio 1, per-reply averaging) is -mean(A) = 0, the report still gives the uncentred mean,
    # and the update moves tokens along the centred teacher preference.
    tr = Trainer(cfg(lr=3e-4, teacher="base", w_rl=0.0, opd_center=True), model_path=tiny_model_dir)
    s = fixed_samples(tr.tokenizer)[1]
    pairs = [(s.prompt_ids, s.response_ids)]
    teacher, _, _ = tr._score([(s.teacher_prompt_ids, s.response_ids)])
    old, _, _ = tr._score(pairs)
    adv = teacher - old
    assert abs(float(adv.mean())) > 1e-3  # the uncentred term has a mean that centring removes
    rep = tr.update([s])
    new, _, _ = tr._score(pairs)
    assert rep.loss_first == pytest.approx(0.0, abs=1e-6)
    assert rep.opd_adv_mean == pytest.approx(float(adv.mean()), abs=1e-5)
    assert float(((new - old) * (adv - adv.mean())).sum()) > 0
    plain = Trainer(cfg(lr=3e-4, teacher="base", w_rl=0.0), model_path=tiny_model_dir)
    assert plain.update([s]).loss_first == pytest.approx(-float(adv.mean()), abs=1e-5)


def test_unlikelihood_pushes_a_confident_token_where_the_policy_gradient_barely_does():
    from backend.trainer import loss as L

    # One position, a token with p = 0.9: d/dlogit of -log(1 - p) is p (0.9), while the PPO
    # term with A = -1 at ratio 1 gives (1 - p) (0.1). Both lower the token.
    logits = torch.tensor([[[4.0, 0.0, 0.0, 0.0]]])
    logits[0, 0, 1:] = torch.log(torch.tensor(0.1 / 3)) + 4.0 - torch.log(torch.tensor(0.9))
    logits.requires_grad_(True)
    lp = torch.log_softmax(logits, -1)[..., 0]  # [1, 1] log p of token 0 (token_logp without megatron's TP state)
    assert float(lp.exp()) == pytest.approx(0.9, abs=1e-5)
    (g_ul,) = torch.autograd.grad(L.unlikelihood(lp[0], torch.ones(1)), logits, retain_graph=True)
    (g_pg,) = torch.autograd.grad(L.ppo_loss(lp[0], lp[0].detach(), torch.tensor([-1.0]), torch.ones(1), 0.2, 0.2)[0], logits)
    assert float(g_ul[0, 0, 0]) == pytest.approx(0.9, abs=1e-4)
    assert float(g_pg[0, 0, 0]) == pytest.approx(0.1, abs=1e-4)
    assert float(L.unlikelihood(lp[0], torch.zeros(1))) == 0.0  # no quoted token, no term


def test_quoted_words_get_the_unlikelihood_term_in_the_update(tiny_model_dir):
    # The same criticised reply with and without w_quoted, from the same weights: the first loss
    # differs by exactly w_quoted * mean(-log(1 - p_old)) over the marked tokens, and only marked
    # tokens inside the trained reply count.
    def run(w, positions):
        tr = Trainer(cfg(lr=3e-3, w_quoted=w, w_opd=0.0), model_path=tiny_model_dir)
        s = Sample(**{**rewarded(tr, -1).to_dict(), "quoted_positions": positions})
        old, _, _ = tr._score([(s.prompt_ids, s.response_ids)])
        return old, tr.update([s])

    old, rep0 = run(0.0, [2, 5])
    _, rep1 = run(2.0, [2, 5, 10_000])
    assert (rep0.n_quoted, rep1.n_quoted) == (0, 2)
    ul = float(-torch.log1p(-old[[2, 5]].exp()).mean())
    assert rep1.loss_first == pytest.approx(rep0.loss_first + 2.0 * ul, rel=1e-5)


def test_token_match_moves_a_token_by_p_minus_the_teachers_p():
    from backend.trainer import loss as L

    # One position, the written token at p = 0.9, the teacher's p_T = 0.45: d/dlogit is p - p_T = 0.45
    # (the PPO term with the same log-ratio as advantage gives A (1 - p), about 0.07); at p == p_T the
    # term and its gradient are 0, so the push cannot overshoot the teacher.
    logits = torch.tensor([[[4.0, 0.0, 0.0, 0.0]]])
    logits[0, 0, 1:] = torch.log(torch.tensor(0.1 / 3)) + 4.0 - torch.log(torch.tensor(0.9))
    logits.requires_grad_(True)
    lp = torch.log_softmax(logits, -1)[..., 0]  # [1, 1]
    t_lp = torch.log(torch.tensor([0.45]))
    (g,) = torch.autograd.grad(L.token_match(lp[0], t_lp, torch.ones(1)), logits, retain_graph=True)
    assert float(g[0, 0, 0]) == pytest.approx(0.45, abs=1e-4)
    (g_pg,) = torch.autograd.grad(L.ppo_loss(lp[0], lp[0].detach(), t_lp - lp[0].detach(), torch.ones(1), 0.2, 0.2)[0], logits)
    assert float(g_pg[0, 0, 0]) == pytest.approx(-0.1 * float(torch.log(torch.tensor(0.5))), abs=1e-4)  # -A (1 - p)
    same = lp[0].detach().clone().requires_grad_(True)
    zero = L.token_match(same, same.detach(), torch.ones(1))
    (g0,) = torch.autograd.grad(zero, same)
    assert abs(float(zero)) < 1e-6 and abs(float(g0[0])) < 1e-6


def test_token_match_term_in_the_update_covers_hinted_replies_only(tiny_model_dir):
    # Six +1 updates on a reply first raise its tokens above the frozen base's (the teacher here);
    # then one update on that reply, criticised with a hint, beside an unhinted praised reply, with and
    # without w_token_match: the first loss differs by exactly w * the hinted reply's mean KL (the
    # praised reply adds nothing), and the term pulls the hinted tokens further toward the teacher.
    def run(w):
        tr = Trainer(cfg(mode="full", lr=1e-3, teacher="base", w_opd=0.0, w_token_match=w), model_path=tiny_model_dir)
        praised, hinted = fixed_samples(tr.tokenizer)
        praised = Sample(**{**praised.to_dict(), "reward": 1})
        raised = Sample(**{**hinted.to_dict(), "reward": 1, "hint": None, "teacher_prompt_ids": None})
        for _ in range(6):
            tr.update([raised])
        with tr._base_ctx():
            teacher, _, _ = tr._score([(hinted.teacher_prompt_ids, hinted.response_ids)])
        old, _, _ = tr._score([(hinted.prompt_ids, hinted.response_ids)])
        rep = tr.update([praised, hinted])
        new, _, _ = tr._score([(hinted.prompt_ids, hinted.response_ids)])
        return teacher, old, new, rep

    _, _, new0, rep0 = run(0.0)
    teacher, old, new1, rep1 = run(2.0)
    p, pt = old.exp(), teacher.exp()
    kl = pt * (pt.log() - old) + (1 - pt) * (torch.log1p(-pt) - torch.log1p(-p))
    assert float(kl.mean()) > 1e-5  # the +1 updates moved the policy away from the teacher
    # (a float32 loss of order 1: 2e-7 is its rounding, 100x below the term; halved or dropped, it fails)
    assert rep1.loss_first == pytest.approx(rep0.loss_first + 2.0 * float(kl.mean()), abs=2e-7)
    assert float((teacher - new1).abs().mean()) < float((teacher - new0).abs().mean())


def test_topk_opd_follows_the_teacher_distribution(tiny_model_dir):
    from backend.trainer import loss as L

    tr = Trainer(cfg(lr=3e-3, teacher="base", w_rl=0.0, opd_topk=8), model_path=tiny_model_dir)
    s = fixed_samples(tr.tokenizer)[1]
    with torch.no_grad():
        t_logits, _ = tr._reply_logits([(s.teacher_prompt_ids, s.response_ids)])
        t_lp, t_idx = L.topk_global(t_logits, 8)

        def student_topk():
            logits, _ = tr._reply_logits([(s.prompt_ids, s.response_ids)])
            return L.gather_logp(logits, L.log_normalizer(logits), t_idx)

        old = student_topk()
    tr.update([s])
    new = student_topk()
    w = torch.softmax(t_lp, -1)
    adv = (t_lp - old).clamp(-2, 2)
    assert float((w * adv * (new - old)).sum()) > 0


def test_combined_reward_centering_shrinks_constant_punishment(tiny_model_dir):
    tr = Trainer(cfg(lr=1e-3, baseline_momentum=0.5), model_path=tiny_model_dir)
    bad = rewarded(tr, -1)
    first = tr.update([bad, bad])
    second = tr.update([bad, bad])
    third = tr.update([bad, bad])
    assert first.rl_adv_mean == pytest.approx(-1.0)
    assert second.baseline == pytest.approx(-0.75) and second.rl_adv_mean == pytest.approx(-0.25)
    assert abs(third.rl_adv_mean) < abs(second.rl_adv_mean)


def test_mean_baseline_gives_constant_punishment_no_push(tiny_model_dir):
    # 'mean' corrects the running mean for its start at 0: a person who only ever criticises gives
    # advantage 0 from the first update on, where 'ema' starts at -1 (the test above).
    tr = Trainer(cfg(lr=1e-3, baseline="mean", baseline_momentum=0.5), model_path=tiny_model_dir)
    bad = rewarded(tr, -1)
    reports = [tr.update([bad, bad]) for _ in range(3)]
    for r in reports:
        assert r.baseline == pytest.approx(-1.0) and r.rl_adv_mean == pytest.approx(0.0)
    assert tr.baseline == pytest.approx(-(1 - 0.5 ** 6))  # the EMA itself runs on, uncorrected


def test_mean_baseline_is_the_weighted_mean_of_rewards_seen(tiny_model_dir):
    tr = Trainer(cfg(lr=1e-3, baseline="mean", baseline_momentum=0.5), model_path=tiny_model_dir)
    bad = rewarded(tr, -1)
    good = Sample(**{**bad.to_dict(), "reward": 1})
    first = tr.update([good, bad])
    assert first.baseline == pytest.approx(0.0)  # no reward seen yet: the batch's own mean
    second = tr.update([bad, bad])
    # rewards +1 then -1 with weights 0.25 and 0.5 (momentum 0.5), normalised by 0.75
    assert second.baseline == pytest.approx(-1 / 3) and second.rl_adv_mean == pytest.approx(-2 / 3)
    with pytest.raises(UserError):
        cfg(baseline="median")


def _first_step_of_b(tiny_model_dir, w_rl: float, **kw) -> float:
    """Norm of the change of every LoRA B factor in one update of one +1 sample with advantage w_rl."""
    tr = Trainer(cfg(baseline="none", grad_clip=0.0, w_rl=w_rl, **kw), model_path=tiny_model_dir)
    before = {n: p.detach().clone() for n, p in tr.trainable.items() if n.endswith("lora_B")}
    tr.update([rewarded(tr, 1)])
    return sum(float((tr.trainable[n] - b).pow(2).sum()) for n, b in before.items()) ** 0.5


def test_sgd_moves_the_weights_in_proportion_to_the_signal_and_adamw_does_not(tiny_model_dir):
    # Half the advantage: SGD's first step is half as long (B starts at 0, so only B moves, linearly in
    # the gradient); AdamW's first step is about lr per element in the gradient's sign either way.
    sgd = [_first_step_of_b(tiny_model_dir, w, optimizer="sgd", lr=0.5) for w in (1.0, 0.5)]
    adam = [_first_step_of_b(tiny_model_dir, w, lr=1e-3) for w in (1.0, 0.5)]
    assert sgd[0] > 0 and sgd[1] / sgd[0] == pytest.approx(0.5, rel=1e-3)
    assert adam[1] / adam[0] == pytest.approx(1.0, abs=0.05)
    assert isinstance(Trainer(cfg(optimizer="sgd", momentum=0.5), model_path=tiny_model_dir).optimizer, torch.optim.SGD)


def test_sgd_has_its_own_default_rate_and_checked_settings():
    from backend.trainer.config import SGD_LR, TrainerConfigError, config_from_overrides

    assert TrainerConfig(optimizer="sgd").learning_rate == SGD_LR and TrainerConfig(optimizer="sgd", lr=0.2).learning_rate == 0.2
    for bad, message in (({"optimizer": "adam"}, "optimizer must be 'adamw' or 'sgd', not 'adam'."),
                         ({"momentum": 1.0}, "momentum must be in [0, 1).")):
        with pytest.raises(TrainerConfigError) as err:
            config_from_overrides(bad)
        assert str(err.value) == message


@pytest.mark.parametrize("agg", ["token", "sample"])
def test_loss_aggregation_weighs_tokens_or_replies(tiny_model_dir, agg):
    # One update's first loss is -mean(advantage) (ratio 1): with a long -1 reply and a short +1
    # reply, 'token' weighs them by length and 'sample' counts each reply once.
    tr = Trainer(cfg(lr=1e-3, loss_agg=agg), model_path=tiny_model_dir)
    long_bad = rewarded(tr, -1)
    short_good = Sample(**{**long_bad.to_dict(), "reward": 1, "response_ids": long_bad.response_ids[:3]})
    n_long, n_short = len(long_bad.response_ids), 3
    assert n_long > 2 * n_short
    rep = tr.update([long_bad, short_good])
    expected = (n_long - n_short) / (n_long + n_short) if agg == "token" else 0.0
    assert rep.loss_first == pytest.approx(expected, abs=1e-5)


def test_lr_decay_shrinks_each_update_and_zero_keeps_it_constant(tiny_model_dir):
    s = None
    for decay, expected in ((0.5, [1e-3, 1e-3 / 1.5, 1e-3 / 2.0]), (0.0, [1e-3] * 3)):
        tr = Trainer(cfg(lr=1e-3, lr_decay=decay), model_path=tiny_model_dir)
        s = s or rewarded(tr, 1)
        used = []
        for _ in range(3):
            used.append(tr.current_lr())
            tr.update([s])
            assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(used[-1])
        assert used == pytest.approx(expected)


def test_kl_anchor_starts_at_zero_and_is_reported(tiny_model_dir):
    tr = Trainer(cfg(lr=1e-2, kl_coef=0.1, epochs=2, minibatch_size=1), model_path=tiny_model_dir)
    s = rewarded(tr, 1)
    r1 = tr.update([s])
    r2 = tr.update([s])
    assert r1.kl is not None and 0 <= r1.kl < r2.kl  # LoRA B starts at zero: policy == base


def test_kl_anchor_can_leave_the_end_token_alone(tiny_model_dir):
    # the same two updates of the same replies: with kl_eos off a reply that is only the end token
    # pays no KL (the anchor has nothing to hold) while a longer reply still pays on its other tokens
    kls = {}
    for kl_eos in (True, False):
        for reply in ("eos", "word+eos"):
            tr = Trainer(cfg(lr=1e-2, kl_coef=0.1, epochs=2, minibatch_size=1, kl_eos=kl_eos), model_path=tiny_model_dir)
            base = rewarded(tr, 1)
            ids = [tr.eos_id] if reply == "eos" else [base.response_ids[0], tr.eos_id]
            s = Sample(**{**base.to_dict(), "response_ids": ids})
            tr.update([s])
            kls[kl_eos, reply] = tr.update([s]).kl
    assert kls[True, "eos"] > 0.0 and kls[False, "eos"] == 0.0
    assert kls[False, "word+eos"] > 0.0


def test_train_serve_gap_compares_serving_logprobs(tiny_model_dir):
    tr = Trainer(cfg(), model_path=tiny_model_dir)
    s = rewarded(tr, 1)
    lp, _, _ = tr._score([(s.prompt_ids, s.response_ids)])
    exact = Sample(**{**s.to_dict(), "rollout_logprobs": lp.tolist()})
    shifted = Sample(**{**s.to_dict(), "rollout_logprobs": (lp - 0.5).tolist()})
    assert tr.update([exact]).train_serve_gap < 1e-5
    assert tr.update([shifted]).train_serve_gap > 0.3  # the policy moved a bit since, so not exactly 0.5
    assert tr.update([s]).train_serve_gap is None


def test_lora_delta_in_hf_reproduces_megatron_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tr = Trainer(cfg(lr=2e-2, delta_dtype="fp32"), model_path=tiny_model_dir)
    tr.update(fixed_samples(tr.tokenizer))
    ids = prompt_ids(tr)
    ref = full_logits(tr, ids)
    delta = tr.export_delta()
    assert (delta.version, delta.base_version, delta.format) == (1, 0, "lora")
    assert delta.meta["base_fingerprint"] == tr.fingerprint
    header, payload = pack(delta)
    delta = unpack(header, payload)  # sha256 verified
    names = {k.split(".")[-3] for k in delta.tensors}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    folder = save_peft_adapter(delta, tmp_path / "adapter")
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    base = hf(input_ids=torch.tensor([ids])).logits[0].detach()
    peft_model = PeftModel.from_pretrained(hf, str(folder)).eval()
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor([ids])).logits[0]
    assert float((ref - base).abs().max()) > 1e-2  # the update changed something visible
    assert float((got - ref).abs().max()) < 1e-4


def test_full_mode_delta_in_hf_reproduces_megatron_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tr = Trainer(cfg(mode="full", lr=1e-3), model_path=tiny_model_dir)
    tr.update(fixed_samples(tr.tokenizer))
    ids = prompt_ids(tr)
    ref = full_logits(tr, ids)
    delta = tr.export_delta()
    assert delta.format == "full" and delta.absolute
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    state = hf.state_dict()
    assert set(delta.tensors) <= set(state)
    hf.load_state_dict({**state, **delta.tensors})
    with torch.no_grad():
        got = hf(input_ids=torch.tensor([ids])).logits[0]
    assert float((got - ref).abs().max()) < 1e-4


def test_full_mode_trains_with_the_default_kl_anchor_and_base_teacher(tiny_model_dir):
    # Full mode swaps the base weights in place for the KL reference and the base teacher; the
    # first minibatch's forward (built before the swap) must not be backpropagated through
    # (it raised "modified by an inplace operation" before Session 16's fix).
    for extra in (dict(kl_coef=0.2), dict(kl_coef=0.2, teacher="base", guard_variety_drop=0.1)):
        tr = Trainer(cfg(mode="full", lr=1e-3, **extra), model_path=tiny_model_dir)
        samples = fixed_samples(tr.tokenizer)
        before = tr.score(samples)
        rep = tr.update(samples)
        assert rep["kl"] is not None and tr.version == 1
        assert tr.score(samples) != before  # the update reached the weights
        # and the swaps restored the trained weights, not the base ones
        assert any(float((p - tr._base_state[n]).abs().max()) > 0 for n, p in tr.trainable.items())


def test_full_mode_refuses_a_model_whose_delta_the_link_would_refuse(tiny_model_dir, monkeypatch):
    import companion.protocol as P

    monkeypatch.setattr(P, "MAX_DELTA_BYTES", 1024)
    with pytest.raises(UserError, match="mode 'full' would ship .* above the link's cap"):
        Trainer(cfg(mode="full"), model_path=tiny_model_dir)
    Trainer(cfg(), model_path=tiny_model_dir)  # LoRA ships only the adapters


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_model_dir, tmp_path):
    c = TrainerConfig(lr=3e-3, lora_rank=4, guard_tokens=6)  # defaults: KL, entropy floor, guard, 2 epochs
    a = Trainer(c, model_path=tiny_model_dir, checkpoint_dir=tmp_path / "a")
    s1, s2 = fixed_samples(a.tokenizer), [rewarded(a, -1)]
    a.update(s1)
    ra = a.update(s2)
    b = Trainer(c, model_path=tiny_model_dir, checkpoint_dir=tmp_path / "b")
    b.update(s1)
    del b
    b2 = Trainer(c, model_path=tiny_model_dir, checkpoint_dir=tmp_path / "b")
    assert b2.version == 1 and b2.resumed_from == 1
    rb = b2.update(s2)
    assert rb.version == ra.version == 2
    assert rb.loss == ra.loss and rb.baseline == ra.baseline and rb.rep_before == ra.rep_before
    for n, p in a.trainable.items():
        assert torch.equal(p, b2.trainable[n]), n
    assert sorted(x.name for x in (tmp_path / "b").glob("v*")) == ["v000001", "v000002"]
    assert (tmp_path / "b" / "LATEST").read_text() == "v000002"


def test_resume_refuses_a_mismatched_checkpoint(tiny_model_dir, tmp_path):
    a = Trainer(cfg(), model_path=tiny_model_dir, checkpoint_dir=tmp_path)
    a.update(fixed_samples(a.tokenizer))
    with pytest.raises(UserError):
        Trainer(cfg(mode="full"), model_path=tiny_model_dir, checkpoint_dir=tmp_path)
    # AdamW's state does not load into SGD (it failed with KeyError 'momentum'), nor the reverse
    with pytest.raises(UserError, match="optimizer=adamw; this trainer has .* optimizer=sgd"):
        Trainer(cfg(optimizer="sgd"), model_path=tiny_model_dir, checkpoint_dir=tmp_path)


class _ScriptedTeacher(Trainer):
    """A trainer whose greedy replies are scripted: the tiny random model never ends a reply."""

    script: list[list[int]] = []
    seen: list[float] = []  # the writing model's score of a fixed sample, at each call

    def greedy_cached(self, prompts, max_new_tokens):
        assert max_new_tokens == self.cfg.teacher_reply_tokens
        self.seen.append(self.score([rewarded(self, 1)])[0])
        return [list(r) for r in self.script[: len(prompts)]]


def test_teacher_replies_train_the_unhinted_prompt_towards_the_teachers_own_reply(tiny_model_dir):
    tr = _ScriptedTeacher(cfg(lr=3e-3, w_rl=0.0, w_opd=0.0, teacher_replies="self", teacher_reply_tokens=12),
                          model_path=tiny_model_dir)
    hinted = fixed_samples(tr.tokenizer)[1]
    assert hinted.teacher_prompt_ids is not None
    good = prompt_ids(tr, "The capital is Paris.")[-6:]
    criticised = [t for t in hinted.response_ids if t != tr.eos_id]
    # dropped: no reply, one cut at the length limit, a loop, the criticised reply itself
    for bad in ([], list(range(12)), [5, 6, 7] * 3, criticised):
        tr.script = [bad]
        assert tr.teacher_reply_samples([hinted]) == []
    tr.script = [good]
    [t] = tr.teacher_reply_samples([hinted, rewarded(tr, 1)])  # only hinted samples get one
    assert t.prompt_ids == hinted.prompt_ids and t.response_ids == good + [tr.eos_id]
    assert t.teacher_prompt_ids is None and t.advantage == 0.5 and t.reward == 0
    before = mean_logp(tr, t)
    rep = tr.update([hinted])
    assert rep.n_samples == 1 and rep.n_teacher_replies == 1 and rep.n_tokens == len(hinted.response_ids) + len(good) + 1
    assert mean_logp(tr, t) > before + 0.05  # the unhinted prompt now prefers the teacher's reply
    assert tr.n_rewards == 1  # only the judged sample moved the reward baseline
    for off_cfg in (cfg(w_rl=0.0, w_opd=0.0), cfg(teacher_replies="self", w_teacher_reply=0.0)):  # off, or binary's weight 0
        off = _ScriptedTeacher(off_cfg, model_path=tiny_model_dir)
        off.script = [good]
        assert off.update([hinted]).n_teacher_replies == 0


def test_base_teacher_replies_are_written_by_the_frozen_base(tiny_model_dir):
    for who in ("self", "base"):
        tr = _ScriptedTeacher(cfg(lr=3e-3, teacher_replies=who, teacher_reply_tokens=12), model_path=tiny_model_dir)
        tr.script, tr.seen = [[1, 2, 3]], []
        hinted = fixed_samples(tr.tokenizer)[1]
        tr.update([hinted])
        tr.update([hinted])
        assert tr.score([rewarded(tr, 1)])[0] != pytest.approx(tr.seen[0], abs=1e-4)  # the policy moved
        # the base writes with the weights of version 0 every time; 'self' with the current policy
        assert (tr.seen[1] == pytest.approx(tr.seen[0], abs=1e-6)) == (who == "base")


def test_praised_replies_are_replayed_in_later_updates(tiny_model_dir, tmp_path):
    c = cfg(lr=3e-3, w_rl=0.0, w_opd=0.0, replay_praised=1, replay_buffer=2)  # only the replay can move the policy
    tr = Trainer(c, model_path=tiny_model_dir, checkpoint_dir=tmp_path)
    praised, criticised = fixed_samples(tr.tokenizer)  # rewards +1 and -1
    assert tr.replay_samples([praised]) == []  # nothing praised yet
    rep = tr.update([praised])
    assert rep.n_replayed == 0  # a batch never replays its own turn
    assert [p["turn_id"] for p in tr._praised] == [praised.turn_id]
    assert tr.replay_samples([praised]) == []  # ... even once it is in the buffer
    before = mean_logp(tr, praised)
    rep = tr.update([criticised])
    assert rep.n_replayed == 1 and rep.n_samples == 1 and rep.n_teacher_replies == 0
    assert rep.n_tokens == len(criticised.response_ids) + len(praised.response_ids)
    assert mean_logp(tr, praised) > before + 0.05  # the praised reply was trained towards again
    assert [p["turn_id"] for p in tr._praised] == [praised.turn_id]  # a -1 reply is never kept
    assert tr.n_rewards == 2  # the replay did not move the reward baseline
    # the buffer keeps the newest replay_buffer praised replies and survives a restart
    more = [Sample(**{**praised.to_dict(), "turn_id": f"p{i}"}) for i in range(2)]
    tr.update(more)
    assert [p["turn_id"] for p in tr._praised] == ["p0", "p1"]
    again = Trainer(c, model_path=tiny_model_dir, checkpoint_dir=tmp_path)
    assert [p["turn_id"] for p in again._praised] == ["p0", "p1"]
    [r] = again.replay_samples([criticised])
    assert r.turn_id in ("p0", "p1") and r.advantage == 0.5 and r.reward == 0 and r.teacher_prompt_ids is None
    assert [x.turn_id for x in again.replay_samples([criticised])] == [r.turn_id]  # seeded: same pick on rerun
    assert (TrainerConfig().replay_praised, TrainerConfig().replay_buffer) == (2, 4)  # on by default (Session 11)
    off = Trainer(cfg(lr=3e-3, replay_praised=0), model_path=tiny_model_dir)
    off.update([praised])
    assert off._praised == [] and off.update([criticised]).n_replayed == 0


def test_opd_rollouts_train_the_policys_own_greedy_reply_towards_the_hinted_teacher(tiny_model_dir, tmp_path):
    # rollout_max_repeat 1.0: the tiny random model's greedy replies loop, and would all be dropped
    c = cfg(lr=3e-3, w_rl=0.0, opd_rollouts=1, rollout_tokens=10, rollout_buffer=2, rollout_max_repeat=1.0)
    tr = Trainer(c, model_path=tiny_model_dir, checkpoint_dir=tmp_path)
    praised, hinted = fixed_samples(tr.tokenizer)
    [r] = tr.rollout_samples([praised, hinted])  # only a hinted prompt is rolled out
    assert r.prompt_ids == hinted.prompt_ids and r.teacher_prompt_ids == hinted.teacher_prompt_ids
    assert r.response_ids == tr.greedy_cached([hinted.prompt_ids], 10)[0] and r.reward == 0
    pair, tpair = (r.prompt_ids, r.response_ids), (r.teacher_prompt_ids, r.response_ids)
    old, teacher = tr._score([pair])[0], tr._score([tpair])[0]
    twin = Trainer(cfg(lr=3e-3, w_rl=0.0), model_path=tiny_model_dir)  # the same update without the rollout
    twin.update([hinted])
    rep = tr.update([hinted])
    assert rep.n_rollouts == 1 and rep.n_samples == 1 and rep.n_hinted == 1 and rep.n_teacher_replies == 0
    assert rep.n_tokens == len(hinted.response_ids) + len(r.response_ids) and rep.rollout_s > 0
    adv = teacher - old
    moved = float(((tr._score([pair])[0] - old) * adv).sum())
    moved_without = float(((twin._score([pair])[0] - old) * adv).sum())
    assert moved > moved_without + 1e-4  # the rollout's own tokens moved towards the teacher
    assert tr.n_rewards == 1  # the rollout (reward 0) never enters the baseline
    # the corrected prompt is kept: a later batch with no correction still rolls it out, after a restart too
    assert [p["turn_id"] for p in tr._hinted] == [hinted.turn_id]
    again = Trainer(c, model_path=tiny_model_dir, checkpoint_dir=tmp_path)
    assert [p["turn_id"] for p in again._hinted] == [hinted.turn_id]
    assert again.update([praised]).n_rollouts == 1
    more = [Sample(**{**hinted.to_dict(), "turn_id": f"h{i}"}) for i in range(3)]
    again.update(more)
    assert [p["turn_id"] for p in again._hinted] == ["h1", "h2"]  # the newest rollout_buffer
    picks = [again.rollout_samples([praised])[0].turn_id for _ in range(2)]
    assert picks[0] in ("h1", "h2") and picks[0] == picks[1]  # seeded by the version: the same pick on rerun
    assert TrainerConfig().opd_rollouts == 0  # off by default
    off = Trainer(cfg(lr=3e-3), model_path=tiny_model_dir)
    assert off.update([hinted]).n_rollouts == 0 and off._hinted == []
    with pytest.raises(UserError):
        TrainerConfig(opd_rollouts=-1)


class _ScriptedRollouts(Trainer):
    """Greedy rollouts from a script (the tiny random model's own replies neither end nor vary)."""

    script: list[list[int]] = []
    limit = "rollout_tokens"  # the config field that must set the rollout's length

    def greedy_cached(self, prompts, max_new_tokens):
        assert max_new_tokens == getattr(self.cfg, self.limit)
        return [list(r) for r in self.script[: len(prompts)]]


def test_opd_rollouts_drop_empty_and_looping_replies_and_keep_an_ended_ones_end(tiny_model_dir):
    tr = _ScriptedRollouts(cfg(opd_rollouts=4, rollout_tokens=8), model_path=tiny_model_dir)
    hinted = fixed_samples(tr.tokenizer)[1]
    batch = [Sample(**{**hinted.to_dict(), "turn_id": f"h{i}"}) for i in range(4)]
    tr.script = [[], [5, 6] * 4, [5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]]  # empty, loop, ended, cut at the limit
    ended, cut = tr.rollout_samples(batch)
    assert (ended.turn_id, ended.response_ids) == ("h2", [5, 6, 7, tr.eos_id])  # the teacher judges stopping too
    assert (cut.turn_id, cut.response_ids) == ("h3", [1, 2, 3, 4, 5, 6, 7, 8])  # cut: no eos
    strict = _ScriptedRollouts(cfg(opd_rollouts=4, rollout_tokens=8, rollout_max_repeat=0.1), model_path=tiny_model_dir)
    strict.script = [[5, 6, 7, 8, 5, 6, 7, 9]]  # one repeated 3-gram in six: kept at the default 0.5, not at 0.1
    tr.script = strict.script
    assert strict.rollout_samples(batch[:1]) == [] and len(tr.rollout_samples(batch[:1])) == 1
    assert _ScriptedRollouts(cfg(opd_rollouts=4, w_opd=0.0), model_path=tiny_model_dir).rollout_samples(batch) == []


def test_repeated_ngram_positions_mark_every_token_of_a_repeat_but_not_the_first():
    from backend.trainer.trainer import repeated_ngram_positions

    assert repeated_ngram_positions([1, 2, 3, 4, 5], 2) == []
    assert repeated_ngram_positions([1, 2, 3, 1, 2, 9], 2) == [3, 4]
    assert repeated_ngram_positions([7] * 5, 2) == [1, 2, 3, 4]
    assert repeated_ngram_positions([5, 6, 7, 8, 5, 6, 7, 8], 4) == [4, 5, 6, 7]
    assert repeated_ngram_positions([5, 6, 7, 5, 6, 8], 4) == []


class _ScriptedLoops(_ScriptedRollouts):
    """The loop term's greedy replies from a script."""

    limit = "loop_tokens"


def test_loop_term_pushes_down_the_tokens_a_greedy_reply_repeats(tiny_model_dir):
    from backend.trainer.trainer import repeated_ngram_positions

    # The same batch trained with and without w_loops from the same weights (the term alone: on the tiny
    # random model p is about 1e-4, so any policy-gradient term would drown it): the first loss differs by
    # exactly w_loops * mean(-log(1 - p)) over the repeated tokens of the policy's greedy reply, and the
    # update makes those tokens less likely.
    probe = Trainer(cfg(), model_path=tiny_model_dir)
    s = rewarded(probe, -1)
    loop = probe.greedy_cached([s.prompt_ids], 8)[0]  # the tiny random model's greedy reply loops, surely
    marked = repeated_ngram_positions(loop, 2)
    assert marked

    def run(w, script):
        tr = _ScriptedLoops(cfg(lr=3e-3, w_rl=0.0, w_opd=0.0, w_loops=w, loop_tokens=8, loop_ngram=2), model_path=tiny_model_dir)
        tr.script = script
        pair = (s.prompt_ids, loop)
        old = tr._score([pair])[0]
        rep = tr.update([s])
        return old, rep, tr._score([pair])[0]

    old, rep0, after0 = run(0.0, [loop])
    _, rep1, after1 = run(2.0, [loop])
    assert (rep0.loop_tokens, rep1.loop_tokens) == ([], [len(marked)]) and rep0.loop_term is None
    ul = float(-torch.log1p(-old[marked].exp()).mean())
    assert rep1.loss_first == pytest.approx(rep0.loss_first + 2.0 * ul, rel=1e-5)
    assert rep1.loop_term == pytest.approx(ul, rel=1e-5)
    assert torch.equal(after0, old) and bool((after1[marked] < old[marked] - 0.01).all())
    # a greedy reply that repeats nothing adds nothing: the update is the one without the term
    _, rep2, after2 = run(2.0, [[5, 6, 7, 8, 9, 10]])
    assert rep2.loop_tokens == [0] and rep2.loss_first == pytest.approx(rep0.loss_first, rel=1e-6)
    assert torch.equal(after2, after0)


def _recording_greedy(tr):
    """Record the trainer's greedy calls: (prompts, replies) of greedy_cached, (prompts, references) of greedy_drafted."""
    cached, drafted = [], []
    real, real_drafted = tr.greedy_cached, tr.greedy_drafted

    def greedy_cached(prompts, n):
        out = real(prompts, n)
        cached.append((prompts, out))
        return out

    tr.greedy_cached = greedy_cached
    tr.greedy_drafted = lambda prompts, n, refs: drafted.append((prompts, refs)) or real_drafted(prompts, n, refs)
    return cached, drafted


def test_loop_term_rolls_out_every_epoch_one_prompt_per_conversation_and_prepare_writes_the_first_ahead(tiny_model_dir):
    praised, hinted = fixed_samples(Trainer(cfg(), model_path=tiny_model_dir).tokenizer)
    rewrite = Sample(**{**praised.to_dict(), "turn_id": "rw", "prompt_ids": praised.prompt_ids + [5, 6, 7]})
    batch = [praised, rewrite, hinted]

    def trained(prepare: bool):
        tr = Trainer(cfg(lr=3e-3, w_loops=1.0, loop_tokens=12, loop_prompts=2, epochs=2), model_path=tiny_model_dir)
        cached, drafted = _recording_greedy(tr)
        if prepare:  # while the batch fills, as the backend calls it: one reply per call, once its prompt is known
            assert tr.prepare(batch[:1]) is True and tr.prepare(batch[:2]) is False  # the rewrite: same conversation
            assert tr.prepare(batch) is True and tr.prepare(batch) is False
        return tr, cached, drafted, tr.update(batch)

    tr, cached, drafted, rep = trained(prepare=False)
    # epoch 0 writes the replies one prompt at a time, epoch 1 rewrites them drafted from epoch 0's
    # (the rewrite continues the first conversation, so two prompts)
    assert [c[0] for c in cached] == [[praised.prompt_ids], [hinted.prompt_ids]]
    assert drafted == [([praised.prompt_ids, hinted.prompt_ids], [c[1] for c in cached])]
    assert len(rep.loop_tokens) == 2 and rep.loop_s > 0 and rep.loop_prepared == 0  # the tiny model's replies loop
    # written ahead: the update writes only epoch 1's, and learns exactly the same
    ptr, pcached, pdrafted, prep = trained(prepare=True)
    assert pcached == cached and pdrafted == drafted and prep.loop_prepared == 2
    assert prep.loop_tokens == rep.loop_tokens
    assert all(torch.equal(p, tr.trainable[n]) for n, p in ptr.trainable.items())
    assert ptr.prepare(batch) is True  # new weights: their replies are not written yet
    assert TrainerConfig().w_loops == 1.0 and TrainerConfig().loop_refresh == "epoch"  # on by default (Session 30)


def test_loop_refresh_update_writes_once_to_the_previous_batch_and_prepare_takes_it_off_the_update(tiny_model_dir, tmp_path):
    praised, hinted = fixed_samples(Trainer(cfg(), model_path=tiny_model_dir).tokenizer)
    rewrite = Sample(**{**praised.to_dict(), "turn_id": "rw", "prompt_ids": praised.prompt_ids + [5, 6, 7]})
    other = Sample(**{**praised.to_dict(), "turn_id": "o", "prompt_ids": hinted.prompt_ids + [8, 9]})
    batches = [[praised, rewrite, hinted], [other, praised], [hinted, other]]

    def trained(prepare: bool, ckpt=None):
        tr = Trainer(cfg(lr=3e-3, w_loops=1.0, loop_refresh="update", loop_tokens=12, loop_prompts=2, epochs=2),
                     model_path=tiny_model_dir, checkpoint_dir=ckpt)
        cached, drafted = _recording_greedy(tr)
        reps = []
        for b in batches:
            while prepare and tr.prepare():
                pass
            reps.append(tr.update(b))
        return tr, [c[0] for c in cached], reps, drafted

    tr, seen, reps, drafted = trained(prepare=False, ckpt=tmp_path)
    # once per update (two epochs), one prompt per conversation (the rewrite continues the first one):
    # the first update its own batch, then each the batch before it
    assert seen == [[praised.prompt_ids], [hinted.prompt_ids], [praised.prompt_ids], [hinted.prompt_ids],
                    [other.prompt_ids], [praised.prompt_ids]] and drafted == []
    assert all(r.loop_s > 0 and r.loop_prepared == 0 and len(r.loop_tokens) == 1 for r in reps)
    assert reps[0].loop_tokens[0] > 0  # the tiny model's greedy replies loop
    # prepared while idle: the same replies, so the same weights, and the updates after the first write none
    ptr, pseen, preps, _ = trained(prepare=True)
    assert pseen == seen and [r.loop_prepared for r in preps] == [0, 2, 2]
    assert [r.loop_tokens for r in preps] == [r.loop_tokens for r in reps]
    assert all(torch.equal(p, tr.trainable[n]) for n, p in ptr.trainable.items())
    assert ptr.prepare() is True and ptr.prepare() is False  # the last batch is one conversation
    # the next update's prompts survive a restart
    assert Trainer(cfg(w_loops=1.0, loop_refresh="update", loop_tokens=12, epochs=2), model_path=tiny_model_dir,
                   checkpoint_dir=tmp_path).prepare()
    assert Trainer(cfg(), model_path=tiny_model_dir).prepare() is False  # the term is off (QUIET)


class _LoopingProbe(Trainer):
    """A trainer whose greedy probe reports a loop after any update (drives the guard's refusal path)."""

    def _repetition(self, prompts):
        return (0.0, 20.0) if self.step == 0 else (0.9, 20.0)


class _ShrinkingProbe(Trainer):
    """A trainer whose greedy probe replies collapse to 2 tokens after any update."""

    def _repetition(self, prompts):
        return (0.0, 20.0) if self.step == 0 else (0.0, 2.0)


def test_repetition_guard_refuses_and_restores_exactly(tiny_model_dir, tmp_path):
    tr = _LoopingProbe(cfg(repetition_guard=True, lr=1e-2), model_path=tiny_model_dir, checkpoint_dir=tmp_path)
    params = {n: p.detach().clone() for n, p in tr.trainable.items()}
    opt = copy.deepcopy(tr.optimizer.state_dict())
    rep = tr.update(fixed_samples(tr.tokenizer))
    # refused: weights and optimizer restored exactly, published as a new (unchanged) version
    assert not rep.accepted and "repetition" in rep.reason and rep.version == 1 and tr.version == 1
    assert all(torch.equal(p, params[n]) for n, p in tr.trainable.items())
    assert tr.optimizer.state_dict()["state"] == opt["state"] and tr.step == 0
    assert (tmp_path / "LATEST").read_text() == "v000001"
    assert all(float(t.abs().max()) == 0 for k, t in tr.export_delta().tensors.items() if "lora_B" in k)


def test_serve_ema_exports_the_average_and_trains_exactly_as_without_it(tiny_model_dir, tmp_path):
    samples_of = lambda tr: fixed_samples(tr.tokenizer)  # noqa: E731
    plain = Trainer(cfg(lr=1e-2, delta_dtype="fp32"), model_path=tiny_model_dir)
    avg = Trainer(cfg(lr=1e-2, delta_dtype="fp32", serve_ema=0.5), model_path=tiny_model_dir,
                  checkpoint_dir=tmp_path)
    w0 = {n: p.detach().clone() for n, p in plain.trainable.items()}
    plain.update(samples_of(plain))
    avg.update(samples_of(avg))
    w1 = {n: p.detach().clone() for n, p in plain.trainable.items()}
    delta1 = avg.export_delta()
    plain.update(samples_of(plain))
    avg.update(samples_of(avg))
    w2 = {n: p.detach().clone() for n, p in plain.trainable.items()}
    # training, and exporting, never see the average: the trained weights are the plain run's
    assert all(torch.equal(p, avg.trainable[n]) for n, p in plain.trainable.items())
    resumed = Trainer(cfg(lr=1e-2, delta_dtype="fp32", serve_ema=0.5), model_path=tiny_model_dir,
                      checkpoint_dir=tmp_path)  # the average is checkpointed

    def exported(weights):  # what the plain trainer exports when it holds these weights
        with plain._holding(weights):
            return plain.export_delta().tensors

    want1 = exported({n: 0.5 * w0[n] + 0.5 * w1[n] for n in w0})
    assert all(torch.allclose(delta1.tensors[k], want1[k], atol=1e-6) for k in want1)
    want2 = exported({n: 0.25 * w0[n] + 0.25 * w1[n] + 0.5 * w2[n] for n in w0})
    for tr in (avg, resumed):
        served = tr.export_delta().tensors
        assert served.keys() == want2.keys()
        assert all(torch.allclose(served[k], want2[k], atol=1e-6) for k in want2)
    b = next(k for k in served if "lora_B" in k)
    assert not torch.allclose(served[b], exported(w2)[b])  # the average is not the newest trained weights


def test_serve_ema_keeps_its_average_when_the_guard_refuses(tiny_model_dir):
    tr = _LoopingProbe(cfg(repetition_guard=True, lr=1e-2, serve_ema=0.5), model_path=tiny_model_dir)
    served = {n: t.clone() for n, t in tr._served.items()}
    assert not tr.update(fixed_samples(tr.tokenizer)).accepted
    assert all(torch.equal(t, served[n]) for n, t in tr._served.items())


def test_length_guard_refuses_a_collapse_to_empty_replies(tiny_model_dir):
    tr = _ShrinkingProbe(cfg(repetition_guard=True, lr=1e-2), model_path=tiny_model_dir)
    params = {n: p.detach().clone() for n, p in tr.trainable.items()}
    rep = tr.update(fixed_samples(tr.tokenizer))
    assert not rep.accepted and "length" in rep.reason and (rep.len_before, rep.len_after) == (20.0, 2.0)
    assert all(torch.equal(p, params[n]) for n, p in tr.trainable.items())
    assert tr.baseline == 0.0  # a refused batch does not move the reward baseline either


class _StockPhraseProbe(Trainer):
    """Greedy probe replies that are varied before any update and, after one, the same stock phrase
    for every prompt (the Session 8 collapse: replies loop or share a phrase across prompts)."""

    def greedy_cached(self, prompts, max_new_tokens):
        if self.step == 0:
            return [[20 * i + k for k in range(12)] for i in range(len(prompts))]
        return [[5, 6, 7, 8, 9, 10] for _ in prompts]


def test_variety_guard_refuses_replies_that_lose_variety_against_the_base(tiny_model_dir, tmp_path):
    from backend.trainer.trainer import pooled_distinct_ngrams

    assert pooled_distinct_ngrams([[1, 2, 3, 4, 5]]) == 1.0
    assert pooled_distinct_ngrams([[1, 2, 3, 4], [1, 2, 3, 4]]) == 0.5  # one phrase for two prompts
    tr = _StockPhraseProbe(cfg(guard_variety_drop=0.1, lr=1e-2), model_path=tiny_model_dir, checkpoint_dir=tmp_path)
    params = {n: p.detach().clone() for n, p in tr.trainable.items()}
    samples = fixed_samples(tr.tokenizer)
    rep = tr.update(samples)
    assert not rep.accepted and "distinct-4" in rep.reason
    assert rep.variety_base == 1.0 and rep.variety_after == pytest.approx(1 / len(samples))
    assert all(torch.equal(p, params[n]) for n, p in tr.trainable.items()) and tr.step == 0
    assert tr._variety_prompts == [list(s.prompt_ids) for s in samples[:4]]
    again = Trainer(cfg(guard_variety_drop=0.1, lr=1e-2), model_path=tiny_model_dir, checkpoint_dir=tmp_path)
    assert (again._variety_base, again._variety_prompts) == (1.0, tr._variety_prompts)  # checkpointed
    off = _StockPhraseProbe(cfg(lr=1e-2), model_path=tiny_model_dir)  # guard_variety_drop defaults to 0: off
    rep = off.update(samples)
    assert rep.accepted and rep.variety_base is None and rep.variety_after is None and off._variety_prompts == []


def test_variety_probe_takes_one_prompt_per_conversation(tiny_model_dir):
    from backend.trainer.trainer import distinct_conversations

    a, b = [1, 2, 3], [1, 2, 9]
    rewrite_of_a = a + [7, 8, 4, 5]  # the same conversation, one turn later
    assert distinct_conversations([a, rewrite_of_a, b, a[:2]]) == [a, b]
    tr = _StockPhraseProbe(cfg(guard_variety_drop=0.1, lr=1e-2), model_path=tiny_model_dir)
    first, *rest = fixed_samples(tr.tokenizer)
    rewrite = Sample(**{**first.to_dict(), "prompt_ids": first.prompt_ids + rest[0].response_ids + first.prompt_ids[-3:]})
    tr.update([first, rewrite, *rest])
    assert tr._variety_prompts == [list(s.prompt_ids) for s in [first, *rest]][:4]


def test_variety_guard_measures_the_frozen_base_even_when_first_used_later(tiny_model_dir):
    tr = Trainer(cfg(lr=5e-2), model_path=tiny_model_dir)
    samples = fixed_samples(tr.tokenizer)
    tr.update(samples)  # a trained version serves before the guard is switched on
    tr._variety_prompts = [list(s.prompt_ids) for s in samples[:4]]
    trained = tr._variety()
    tr.cfg.guard_variety_drop = 0.9
    rep = tr.update(samples)
    fresh = Trainer(cfg(), model_path=tiny_model_dir)
    fresh._variety_prompts = tr._variety_prompts
    assert rep.variety_base == fresh._variety() != trained


def test_a_variety_guard_that_accepts_trains_exactly_as_without_it(tiny_model_dir):
    # Replays with the guard on and nothing refused are the default's runs (docs/replay.md, Session 9):
    # its probes (greedy, under the frozen base too) must not touch weights, optimizer or RNG.
    def train(**kw):
        tr = Trainer(cfg(lr=1e-2, **kw), model_path=tiny_model_dir)
        samples = fixed_samples(tr.tokenizer)
        reports = [tr.update(samples) for _ in range(3)]
        return tr, reports

    plain, _ = train()
    guarded, reports = train(guard_variety_drop=0.99)
    assert all(r.accepted and r.variety_after is not None for r in reports)
    assert all(torch.equal(p, guarded.trainable[n]) for n, p in plain.trainable.items())


def test_greedy_probe_and_repetition_metric(tiny_model_dir):
    from backend.trainer.trainer import repeated_ngram_fraction

    assert repeated_ngram_fraction([1, 2, 3, 4, 5]) == 0.0
    assert repeated_ngram_fraction([7, 7, 7, 7, 7, 7]) == pytest.approx(0.75)
    tr = Trainer(cfg(), model_path=tiny_model_dir)
    p1, p2 = prompt_ids(tr), prompt_ids(tr, "Hi")
    batched = tr.greedy([p1, p2], 5)
    assert batched == [tr.greedy([p1], 5)[0], tr.greedy([p2], 5)[0]]  # left padding is exact
    hf_next = int(full_logits(tr, p1)[-1].argmax())
    assert batched[0][0] == hf_next
    # the guard's KV-cached greedy gives the same tokens as the full recompute, also with a trained adapter
    assert tr.greedy_cached([p1, p2], 5) == batched
    with torch.no_grad():
        for p in tr.trainable.values():
            p.add_(torch.randn_like(p) * 0.05)
    assert tr.greedy_cached([p1, p2], 8) == tr.greedy([p1, p2], 8)


def test_drafted_greedy_gives_the_greedy_replies_in_fewer_forwards_with_a_good_draft(tiny_model_dir):
    from backend.trainer.trainer import ngram_draft

    # drafts: the tokens after the reply's last 3 tokens, in a reference (nearest the reply's position) or a loop
    assert ngram_draft([1, 2, 3], [[9, 1, 2, 3, 4, 5, 6]], k=2) == [4, 5]
    assert ngram_draft([7, 7, 7, 7, 1, 2, 3], [[1, 2, 3, 8, 1, 2, 3, 4, 5]], k=3) == [4, 5]
    assert ngram_draft([7, 1, 2, 3], [[1, 2, 3, 8, 1, 2, 3, 4, 5]], k=3) == [8, 1, 2]
    assert ngram_draft([1, 2, 3, 4, 1, 2, 3], [], k=2) == [4, 1]
    assert ngram_draft([1, 2, 3], [[5, 6, 7, 8]], k=4) == [] and ngram_draft([1, 2], [], k=4) == []
    assert ngram_draft([5], [[5, 6, 7, 8]], k=9) == [6, 7, 8]  # a reply's start aligns with a reference's
    tr = Trainer(cfg(), model_path=tiny_model_dir)
    with torch.no_grad():
        for p in tr.trainable.values():
            p.add_(torch.randn_like(p) * 0.05)
    prompts = [prompt_ids(tr), prompt_ids(tr, "Hi")]
    greedy = tr.greedy_cached(prompts, 40)
    assert tr.greedy_drafted(prompts, 40) == greedy
    plain_forwards = tr.draft_stats[0]
    assert tr.greedy_drafted(prompts, 40, [[r] for r in greedy]) == greedy
    forwards, tokens = tr.draft_stats
    assert tokens == sum(len(r) for r in greedy) == 80 and forwards < plain_forwards / 3
    assert tr.greedy_drafted(prompts, 7) == [r[:7] for r in greedy]  # the length limit holds mid-draft


def test_json_overrides_are_checked_up_front_in_one_sentence():
    from backend.trainer.config import TrainerConfigError, config_from_overrides

    cfg_ = config_from_overrides({"lr": 5e-4, "epochs": 3, "lora_targets": ["qkv", "proj"], "opd_center": True,
                                  "w_opd": 1, "hint_memory": 4, "hint_placement": "system"})
    assert cfg_.lr == 5e-4 and cfg_.epochs == 3 and cfg_.lora_targets == ("qkv", "proj") and cfg_.opd_center
    assert isinstance(cfg_.w_opd, float) and cfg_.hint_memory == 4 and cfg_.hint_placement == "system"
    assert config_from_overrides({"lr": None}).learning_rate == 3e-4
    for bad, message in (({"hint_memroy": 2}, "unknown trainer setting 'hint_memroy' (did you mean 'hint_memory'?)."),
                         ({"zzz": 1}, "unknown trainer setting 'zzz'."),
                         ({"lr": "fast"}, "trainer setting 'lr' must be a number or null, not \"fast\"."),
                         ({"epochs": 2.5}, "trainer setting 'epochs' must be a whole number, not 2.5."),
                         ({"opd_center": 1}, "trainer setting 'opd_center' must be true or false, not 1."),
                         ({"w_rl": True}, "trainer setting 'w_rl' must be a number, not true."),
                         ({"mode": 3}, "trainer setting 'mode' must be text, not 3."),
                         ({"lora_targets": "qkv"}, "trainer setting 'lora_targets' must be a list of names, not \"qkv\"."),
                         ({"hint_memory": -1}, "hint_memory must be 0 (off) or positive."),
                         ({"hint_placement": "middle"}, "hint_placement must be 'user' or 'system'.")):
        with pytest.raises(TrainerConfigError) as err:
            config_from_overrides(bad)
        assert str(err.value) == message


def test_config_and_export_errors(tiny_model_dir):
    for bad in (dict(mode="half"), dict(lora_rank=0), dict(teacher="gpt"), dict(lora_targets=("mlp",)), dict(lr=-1), dict(loss_agg="mean"), dict(lr_decay=-1), dict(hint_memory=-1), dict(hint_memory_scope="some"), dict(w_teacher_reply=-1), dict(teacher_replies="yes"), dict(replay_praised=-1), dict(replay_buffer=0), dict(w_replay=-0.5), dict(w_loops=-1), dict(loop_ngram=0), dict(loop_tokens=2), dict(loop_refresh="turn")):
        with pytest.raises(UserError):
            TrainerConfig(**bad)
    assert TrainerConfig().learning_rate == 3e-4 and TrainerConfig(mode="full").learning_rate == 1e-5
    tr = Trainer(cfg(), model_path=tiny_model_dir)
    with pytest.raises(ValueError):
        tr.export_delta()
    assert tr.update([]).accepted is False and tr.version == 0
