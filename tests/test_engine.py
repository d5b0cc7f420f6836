"""The local serving engine: streaming, log-probs, cancel, batching, weight deltas."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from backend.delta import Delta, DeltaError, pack, save_peft_adapter
from companion.engine.local import GenParams, LocalEngine

MSGS = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Tell me about owls."}]
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(params=[True, False], ids=["fastpath", "hf-forward"])
def engine(tiny_model_dir, request):
    return LocalEngine(tiny_model_dir, dtype="fp32", use_fast_path=request.param)


def random_lora(engine: LocalEngine, version: int, r: int = 4, alpha: float = 8.0, seed: int = 0, scale: float = 0.05) -> Delta:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in engine.model.named_parameters():
        mod = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and mod.rsplit(".", 1)[-1] in LINEAR:
            out_f, in_f = p.shape
            tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * scale
            tensors[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * scale
    meta = {"lora_r": r, "lora_alpha": alpha, "base_fingerprint": engine.fingerprint}
    return Delta(version, version - 1, "lora", tensors, meta)


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.float()


def test_stream_pieces_make_the_reply_and_logprobs_match_a_forward_pass(engine):
    pieces = []
    reply = engine.generate(MSGS, GenParams(max_new_tokens=12, temperature=0), on_token=pieces.append)
    assert "".join(pieces) == reply.text
    assert len(reply.token_ids) == len(reply.logprobs) == 12 and reply.finish_reason == "length"
    assert reply.prompt_ids == engine.prompt_ids(MSGS) and reply.version == 0
    # teacher-forced recomputation of the same tokens gives the same log-probs
    full = reply.prompt_ids + reply.token_ids
    logp = torch.log_softmax(logits_of(engine.model, full)[0, len(reply.prompt_ids) - 1 : -1], -1)
    expected = logp.gather(-1, torch.tensor(reply.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(reply.logprobs), expected, atol=1e-4)


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(engine):
    g1 = engine.generate(MSGS, GenParams(max_new_tokens=8, temperature=0))
    g2 = engine.generate(MSGS, GenParams(max_new_tokens=8, temperature=0))
    assert g1.token_ids == g2.token_ids
    s1 = engine.generate(MSGS, GenParams(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=7))
    s2 = engine.generate(MSGS, GenParams(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=7))
    s3 = engine.generate(MSGS, GenParams(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=8))
    assert s1.token_ids == s2.token_ids != s3.token_ids
    # a tiny nucleus keeps only the top token: sampling becomes greedy
    t = engine.generate(MSGS, GenParams(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3))
    assert t.token_ids == g1.token_ids


def test_cancel_stops_mid_stream(engine):
    stream = engine.stream(MSGS, GenParams(max_new_tokens=200, temperature=0))
    got = []
    for piece in stream:
        got.append(piece)
        if len(got) == 3:
            stream.cancel()
    assert stream.result.finish_reason == "cancelled"
    assert 3 <= len(stream.result.token_ids) < 200


def test_batched_greedy_equals_one_by_one(engine):
    prompts = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Explain photosynthesis in detail please, for a school report."}],
        MSGS,
    ]
    batch = engine.generate_greedy_batch(prompts, max_new_tokens=10)
    for msgs, b in zip(prompts, batch):
        single = engine.generate(msgs, GenParams(max_new_tokens=10, temperature=0))
        assert b.token_ids == single.token_ids
        assert b.prompt_ids == single.prompt_ids


def test_batched_greedy_drops_finished_rows_without_changing_a_reply(tiny_model_dir, monkeypatch):
    # The random tiny model writes one token everywhere; scaled-up weights make its rows differ.
    # Then one row is made to end early: the token it writes third becomes an end token. The
    # other rows go on in a smaller batch and must still give what they give on their own.
    eng = LocalEngine(tiny_model_dir, dtype="fp32")
    with torch.no_grad():
        for p in eng.model.parameters():
            if p.dim() == 2:
                p.mul_(8)  # in place: the fast path's fused weights are the same storage
    prompts = [[{"role": "user", "content": "Hi"}], MSGS,
               [{"role": "user", "content": "Explain photosynthesis in detail please, for a school report."}]]
    first = eng.generate_greedy_batch(prompts, max_new_tokens=12)
    stop = first[0].token_ids[2]
    eng.eos_ids = sorted(set(eng.eos_ids) | {stop})
    kept: list[list[int]] = []
    real = eng._keep_rows
    monkeypatch.setattr(eng, "_keep_rows", lambda state, keep: kept.append(keep) or real(state, keep))
    batch = eng.generate_greedy_batch(prompts, max_new_tokens=12)
    assert batch[0].finish_reason == "eos" and batch[0].token_ids[-1] == stop and len(batch[0].token_ids) <= 3
    assert kept and all(len(k) < 3 for k in kept)  # the finished row really left the batch
    assert any(b.finish_reason == "length" for b in batch[1:])  # and others ran on after it
    for msgs, b in zip(prompts, batch):
        [alone] = eng.generate_greedy_batch([msgs], max_new_tokens=12)
        assert alone.token_ids == b.token_ids and alone.finish_reason == b.finish_reason


def test_a_weight_copy_serves_what_the_source_serves_and_keeps_its_version(tiny_model_dir):
    # bf16: the copy must also take the fast path's fp32 copies, which hold the LoRA fold unrounded
    src, copy = LocalEngine(tiny_model_dir, dtype="bf16"), LocalEngine(tiny_model_dir, dtype="bf16")
    prompts = [[{"role": "user", "content": "Hi"}], MSGS]
    src.apply_delta(random_lora(src, version=1, scale=0.5))  # left unfolded: the copy folds it first
    assert copy.copy_weights_from(src) == 1 and copy.version == 1
    want = [b.token_ids for b in src.generate_greedy_batch(prompts, max_new_tokens=8)]
    assert [b.token_ids for b in copy.generate_greedy_batch(prompts, max_new_tokens=8)] == want
    assert copy.generate(MSGS, GenParams(8, 0)).token_ids == src.generate(MSGS, GenParams(8, 0)).token_ids
    src.apply_delta(random_lora(src, version=2, seed=3, scale=0.5))  # a later version stays with the source
    assert [b.token_ids for b in copy.generate_greedy_batch(prompts, max_new_tokens=8)] == want
    assert src.generate_greedy_batch(prompts, max_new_tokens=8)[0].version == 2
    copy.apply_delta(random_lora(src, version=2, seed=3, scale=0.5))  # and the copy can take it next
    assert [b.token_ids for b in copy.generate_greedy_batch(prompts, max_new_tokens=8)] == \
        [b.token_ids for b in src.generate_greedy_batch(prompts, max_new_tokens=8)]
    with pytest.raises(ValueError):
        LocalEngine(tiny_model_dir, dtype="fp32").copy_weights_from(src)


def test_lora_delta_matches_peft_and_bumps_version(engine, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    delta = random_lora(engine, version=1)
    ids = engine.prompt_ids(MSGS)
    before = logits_of(engine.model, ids)
    assert engine.apply_delta(pack(delta)) == 1  # the (header, payload) wire form, checksum verified
    engine.settle()  # fold now: this test reads the HF weights directly
    after = logits_of(engine.model, ids)
    assert not torch.allclose(before, after, atol=1e-3)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(save_peft_adapter(delta, tmp_path / "adapter"))).eval()
    assert torch.allclose(after, logits_of(peft_model, ids), atol=1e-4)
    # a later version replaces the adapter instead of stacking on it
    engine.apply_delta(random_lora(engine, version=2, seed=1))
    engine.apply_delta(random_lora(engine, version=3, seed=0))
    engine.settle()
    assert torch.allclose(logits_of(engine.model, ids), after, atol=1e-5)


def test_bad_deltas_are_refused_and_the_old_version_keeps_serving(engine):
    ids = engine.prompt_ids(MSGS)
    engine.apply_delta(random_lora(engine, version=1))
    engine.settle()
    good = logits_of(engine.model, ids)
    header, payload = pack(random_lora(engine, version=2, seed=5))
    tampered = payload[:-8] + bytes(8)
    with pytest.raises(DeltaError, match="checksum"):
        engine.apply_delta((header, tampered))
    with pytest.raises(DeltaError, match="not newer"):
        engine.apply_delta(random_lora(engine, version=1, seed=5))
    wrong_base = random_lora(engine, version=2, seed=5)
    wrong_base.meta["base_fingerprint"] = "someothermodel"
    with pytest.raises(DeltaError, match="base model"):
        engine.apply_delta(wrong_base)
    incremental = Delta(5, 4, "full", {"model.norm.weight": torch.zeros(64)}, {})
    with pytest.raises(DeltaError, match="applies on v4"):
        engine.apply_delta(incremental)
    bad_shape = Delta(2, 1, "full", {"model.norm.weight": torch.zeros(3)}, {})
    with pytest.raises(DeltaError, match="shape"):
        engine.apply_delta(bad_shape)
    assert engine.version == 1
    engine.settle()  # nothing pending: a refused delta changed no state
    assert torch.equal(logits_of(engine.model, ids), good)


def test_full_delta_replaces_tensors(engine):
    norm = engine.model.model.norm.weight
    new = torch.full_like(norm, 0.5)
    engine.apply_delta(Delta(1, 0, "full", {"model.norm.weight": new}, {}))
    assert engine.version == 1 and torch.equal(engine.model.model.norm.weight, new)
    assert engine.model.model.norm.weight.data_ptr() == norm.data_ptr()  # copied in place, not reallocated


def test_generation_in_flight_finishes_on_its_version(engine):
    started = threading.Event()
    result = {}

    def slow(piece):
        started.set()
        time.sleep(0.01)

    t = threading.Thread(target=lambda: result.setdefault(
        "r", engine.generate(MSGS, GenParams(max_new_tokens=40, temperature=0), on_token=slow)))
    t.start()
    started.wait(10)
    engine.apply_delta(random_lora(engine, version=1))  # waits for the generation to end
    t.join()
    assert result["r"].version == 0 and len(result["r"].token_ids) == 40
    assert engine.version == 1
    assert engine.generate(MSGS, GenParams(max_new_tokens=2, temperature=0)).version == 1


def test_fast_path_matches_hf_forward_after_a_delta(tiny_model_dir):
    eng = LocalEngine(tiny_model_dir, dtype="fp32")
    assert eng.fast is not None
    eng.apply_delta(random_lora(eng, version=1))  # writes the HF params, which are views of the fused weights
    reply = eng.generate(MSGS, GenParams(max_new_tokens=10, temperature=0))
    full = reply.prompt_ids + reply.token_ids
    logp = torch.log_softmax(logits_of(eng.model, full)[0, len(reply.prompt_ids) - 1 : -1], -1)
    expected = logp.gather(-1, torch.tensor(reply.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(reply.logprobs), expected, atol=1e-4)


@pytest.mark.real_model
def test_real_model_fast_path_logits_match_hf(real_model_dir):
    eng = LocalEngine(real_model_dir, dtype="fp32")
    ids = eng.prompt_ids(MSGS)
    cache = eng.fast.new_cache(1, len(ids))
    fast = eng.fast.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache)
    ref = logits_of(eng.model, ids)[:, -1]
    assert (fast - ref).abs().max() < 1e-4 and fast.argmax() == ref.argmax()


@pytest.mark.real_model
def test_real_model_streams_a_sensible_answer(real_model_dir):
    eng = LocalEngine(real_model_dir, dtype="bf16")
    pieces = []
    reply = eng.generate([{"role": "user", "content": "What is the capital of France?"}],
                         GenParams(max_new_tokens=24, temperature=0), on_token=pieces.append)
    assert "Paris" in reply.text
    assert len(pieces) > 1 and "".join(pieces) == reply.text
    assert reply.finish_reason in ("eos", "length") and all(lp <= 0 for lp in reply.logprobs)


def test_bf16_lora_delta_is_the_merge_rounded_once(tiny_model_dir):
    eng = LocalEngine(tiny_model_dir, dtype="bf16")
    base = eng.model.model.layers[0].mlp.down_proj.weight.detach().float().clone()
    delta = random_lora(eng, version=1)
    a, b = delta.lora_pairs()["model.layers.0.mlp.down_proj"]
    expected = (base + delta.lora_scaling * (b @ a)).to(torch.bfloat16)
    eng.apply_delta(delta)
    eng.settle()
    w = eng.model.model.layers[0].mlp.down_proj.weight
    # equal up to one bf16 ulp (addmm may round its fp32 sum differently from mm + add)
    assert w.dtype == torch.bfloat16 and torch.allclose(w.float(), expected.float(), rtol=2**-7, atol=1e-9)
    first = w.detach().clone()
    eng.apply_delta(random_lora(eng, version=2, seed=3))
    eng.settle()
    assert not torch.equal(w, first)
    eng.apply_delta(random_lora(eng, version=3, seed=0))  # back to the first adapter: no drift
    eng.settle()
    assert torch.equal(w, first)


def test_bf16_wide_steps_use_fp32_copies_that_follow_every_delta(tiny_model_dir):
    """bf16 engine: prefills and batched steps run on fp32 copies of the weights; after LoRA
    and full deltas those copies hold the merged weights, so wide and bf16 steps agree."""
    eng = LocalEngine(tiny_model_dir, dtype="bf16")
    assert eng.fast.wide is not None
    ids = torch.tensor([eng.prompt_ids(MSGS)])
    pos = torch.arange(ids.shape[1])[None]

    def both():
        narrow = eng.fast.forward(ids, pos, eng.fast.new_cache(1, ids.shape[1]), wide=False)
        wide = eng.fast.forward(ids, pos, eng.fast.new_cache(1, ids.shape[1]), wide=True)
        return narrow, wide

    n0, w0 = both()
    assert w0.dtype == torch.float32 and (n0 - w0).abs().max() < 0.05  # bf16 rounding only
    delta = random_lora(eng, version=1)
    eng.apply_delta(delta)
    eng.settle()
    a, b = delta.lora_pairs()["model.layers.0.mlp.down_proj"]
    wide_w = eng.fast.wide_params["model.layers.0.mlp.down_proj.weight"]
    base = eng._lora_base["model.layers.0.mlp.down_proj"]
    assert torch.allclose(wide_w, base + delta.lora_scaling * (b @ a), atol=1e-6)
    n1, w1 = both()
    assert (w1 - w0).abs().max() > 0.05 and (n1 - w1).abs().max() < 0.05  # both moved, together
    full = {"model.norm.weight": torch.full_like(eng.model.model.norm.weight, 0.5, dtype=torch.float32)}
    eng.apply_delta(Delta(version=2, base_version=1, format="full", tensors=full))
    assert torch.equal(eng.fast.wide_params["model.norm.weight"], torch.full_like(full["model.norm.weight"], 0.5))
    n2, w2 = both()
    assert (w2 - w1).abs().max() > 0.05 and (n2 - w2).abs().max() < 0.05


def test_bf16_batched_greedy_is_independent_of_the_batch(tiny_model_dir):
    eng = LocalEngine(tiny_model_dir, dtype="bf16")
    prompts = [[{"role": "user", "content": "Hi"}], MSGS,
               [{"role": "user", "content": "Explain photosynthesis in detail please, for a school report."}]]
    batch = eng.generate_greedy_batch(prompts, max_new_tokens=12)
    for msgs, b in zip(prompts, batch):
        assert eng.generate_greedy_batch([msgs], max_new_tokens=12)[0].token_ids == b.token_ids


def _wait_folded(eng, timeout=20.0) -> bool:
    end = time.monotonic() + timeout
    while not eng.folded and time.monotonic() < end:
        time.sleep(0.01)
    return eng.folded


def test_lora_delta_is_folded_in_the_background_and_generations_never_see_half_folded_weights(tiny_model_dir):
    """apply_delta installs the adapter; the fold into the weights happens afterwards
    (a background thread, or the next generation first). Either way every generation runs
    on the fully folded new version: the same tokens and log-probs as after an explicit fold."""
    eng = LocalEngine(tiny_model_dir, dtype="bf16")
    ref = LocalEngine(tiny_model_dir, dtype="bf16")
    params = GenParams(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=11)
    before = eng.generate(MSGS, params)
    for v, seed in ((1, 0), (2, 5), (3, 9)):
        eng.apply_delta(random_lora(eng, version=v, seed=seed))
        ref.apply_delta(random_lora(ref, version=v, seed=seed))
        ref.settle()
        got = eng.generate(MSGS, params)  # issued at once: folds whatever the background left
        want = ref.generate(MSGS, params)
        assert got.version == want.version == v and eng.folded
        assert got.token_ids == want.token_ids and got.logprobs == want.logprobs
    assert got.logprobs != before.logprobs  # the adapters did change the policy
    # with no generation to wait for, the background thread folds on its own
    eng.apply_delta(random_lora(eng, version=4, seed=2))
    assert _wait_folded(eng)
    ref.apply_delta(random_lora(ref, version=4, seed=2))
    assert ref.settle() > 0 and eng.settle() < 5  # nothing left to fold in eng
    for name, p in ref.model.named_parameters():
        assert torch.equal(p, dict(eng.model.named_parameters())[name]), name


def test_an_adapter_that_drops_a_module_restores_its_base_weight(tiny_model_dir):
    eng = LocalEngine(tiny_model_dir, dtype="bf16")
    down = eng.model.model.layers[0].mlp.down_proj.weight
    base = down.detach().clone()
    eng.apply_delta(random_lora(eng, version=1))
    eng.settle()
    assert not torch.equal(down, base)
    partial = random_lora(eng, version=2, seed=4)
    partial.tensors = {k: t for k, t in partial.tensors.items() if "layers.0.mlp.down_proj" not in k}
    eng.apply_delta(partial)
    eng.settle()
    assert torch.equal(down, base)
    assert torch.equal(eng.fast.wide_params["model.layers.0.mlp.down_proj.weight"], base.float())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_token_decode_step_matches_the_general_step(tiny_model_dir, dtype):
    """The batch-1 decode kernel (_decode_one) against the general forward on the same
    cache: equal in fp32; in bf16 both stay within bf16 rounding of an all-fp32 step."""
    import copy

    eng = LocalEngine(tiny_model_dir, dtype=dtype)
    fast = eng.fast
    ids = torch.tensor([eng.prompt_ids(MSGS)])
    n = ids.shape[1]
    with torch.inference_mode():
        cache = fast.new_cache(1, n + 4)
        assert cache.k.dtype == torch.float32  # attention runs on an fp32 cache in both dtypes
        tok = fast.forward(ids, torch.arange(n)[None], cache).argmax(-1).view(1, 1)
        pos = torch.tensor([[n]])
        everywhere = torch.ones((1, n + 4), dtype=torch.bool)  # a mask forces the general path
        c1, c2, c3 = copy.deepcopy(cache), copy.deepcopy(cache), copy.deepcopy(cache)
        one = fast.forward(tok, pos, c1)  # -> _decode_one
        general = fast.forward(tok, pos, c2, valid=everywhere, wide=False)
        wide = fast.forward(tok, pos, c3, valid=everywhere, wide=True)
    assert c1.length == c2.length == n + 1
    if dtype == "fp32":
        assert torch.allclose(one, general, atol=1e-5)
        assert torch.allclose(c1.k[:, :, :, n], c2.k[:, :, :, n], atol=1e-6)
    else:
        assert (one - wide).abs().max() < 0.05 and (general - wide).abs().max() < 0.05
        assert not torch.equal(one, wide)  # it did run in bf16


def test_a_reply_that_stops_on_eos_carries_the_eos_token_and_its_logprob(engine):
    """Stopping is a sampled decision the trainer must see: the eos id ends token_ids (with
    its log-prob under the serving policy), and the text does not show it."""
    params = GenParams(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=5)
    free = engine.generate(MSGS, params)
    k = next(i for i in range(2, 8) if free.token_ids[i] not in free.token_ids[:i])  # its first occurrence
    stop_id = free.token_ids[k]
    engine.eos_ids = [stop_id]  # pretend this token is the model's eos
    r = engine.generate(MSGS, params)
    assert r.finish_reason == "eos" and r.token_ids == free.token_ids[: k + 1]
    assert r.token_ids[-1] == stop_id and len(r.logprobs) == len(r.token_ids)
    assert r.logprobs == free.logprobs[: k + 1]
    assert r.text == engine.tokenizer.decode(free.token_ids[:k], skip_special_tokens=True)
    greedy = engine.generate(MSGS, GenParams(max_new_tokens=4, temperature=0))
    engine.eos_ids = [greedy.token_ids[0]]  # the batch path: stops on its first token
    [b] = engine.generate_greedy_batch([MSGS], max_new_tokens=4)
    assert b.finish_reason == "eos" and b.token_ids == greedy.token_ids[:1] and b.text == ""
    assert b.logprobs == pytest.approx(greedy.logprobs[:1], abs=1e-5)
