"""Fine-tuning MiniLM's top layers for the judge (backend/judge/tune.py): deterministic,
cached under the cache dir keyed by the bank, never leaking global torch state, and
actually moving stance-bearing messages apart (real MiniLM, a small slice of the bank)."""

from __future__ import annotations

import numpy as np
import pytest

import judge_support as js
from backend.judge.data import TRAIN_PATH, load_bank


@pytest.fixture(scope="module")
def small_bank(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune") / "bank.jsonl"
    lines = TRAIN_PATH.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[::6]) + "\n", encoding="utf-8")     # ~125 rows: a fit takes seconds
    rows = load_bank(path)
    return path, [r["next"] for r in rows], [r["label"] for r in rows]


def test_tuning_is_deterministic_and_restores_torch_state(small_bank):
    import torch
    from backend.judge.tune import TuneConfig, train_top_layers
    _, texts, labels = small_bank
    cfg = TuneConfig(layers=1, epochs=1)
    det, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    rng = torch.random.get_rng_state()
    a = train_top_layers(js.featurizer().encoder, texts, labels, cfg)
    b = train_top_layers(js.featurizer().encoder, texts, labels, cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = js.featurizer().encoder.model.encoder.layer[-1:].state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a)           # the layer did change
    assert torch.are_deterministic_algorithms_enabled() == det and torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng)           # the caller's RNG is untouched
    c = train_top_layers(js.featurizer().encoder, texts, labels, TuneConfig(layers=1, epochs=1, seed=1))
    assert any(not torch.equal(a[k], c[k]) for k in a)              # the seed matters


def test_tuned_encoder_is_cached_by_bank_and_recipe(small_bank, tmp_path, monkeypatch):
    from backend.judge import tune
    path, texts, labels = small_bank
    cfg = tune.TuneConfig(layers=1, epochs=1)
    base = js.featurizer().encoder
    monkeypatch.setattr(tune, "_MEMO", {})
    first = tune.tuned_encoder(base, texts, labels, cfg, tmp_path, path)
    files = list(tmp_path.glob("encoder-*.pt"))
    assert len(files) == 1
    probe = ["Oh fantastic, it crashed again.", "Cheers, works now."]
    e1 = first.encode(probe)
    assert not np.allclose(e1, base.encode(probe))                  # a different encoder...
    assert np.allclose(js.featurizer().encoder.encode(probe), base.encode(probe))   # ...the base is untouched
    monkeypatch.setattr(tune, "_MEMO", {})
    monkeypatch.setattr(tune, "train_top_layers", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = tune.tuned_encoder(base, texts, labels, cfg, tmp_path, path)
    assert np.array_equal(again.encode(probe), e1)                  # loaded from the file, same weights
    assert tune.tuned_encoder(base, texts, labels, cfg, tmp_path, path) is again   # memoised per process
    monkeypatch.undo()
    monkeypatch.setattr(tune, "_MEMO", {})
    files[0].write_bytes(b"not a torch file")                       # corrupt: retrained, never an error
    fresh = tune.tuned_encoder(base, texts, labels, cfg, tmp_path, path)
    assert np.array_equal(fresh.encode(probe), e1)
    monkeypatch.setattr(tune, "_MEMO", {})
    tune.tuned_encoder(base, texts, labels, tune.TuneConfig(layers=1, epochs=2), tmp_path, path)
    assert len(list(tmp_path.glob("encoder-*.pt"))) == 2            # another recipe, another file


def test_tuning_separates_stance_the_frozen_encoder_mixes():
    """On the full bank's tuned encoder, sarcasm sits nearer to complaints than to praise."""
    j = js.judge(3)
    assert j.cfg.tune_layers > 0 and j.featurizer.encoder is not js.featurizer().encoder
    bank = load_bank(TRAIN_PATH)
    sample = {lab: [r["next"] for r in bank if r["label"] == lab and r["kind"] != "sarcasm"][:60] for lab in (-1, 1)}
    sarcasm = ["Oh terrific, the spreadsheet now shows #REF! everywhere. Marvellous.",   # written for this test
               "Super, a museum tour on the one day every museum is shut."]

    def margin(enc):
        cen = {lab: enc.encode(t).mean(0) for lab, t in sample.items()}
        e = enc.encode(sarcasm)
        return float((e @ cen[-1] - e @ cen[1]).mean())              # > 0: closer to complaints

    assert margin(j.featurizer.encoder) > margin(js.featurizer().encoder)
    assert margin(j.featurizer.encoder) > 0
