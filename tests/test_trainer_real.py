"""Real SmolLM2-135M (marked real_model): HF<->Megatron logits, and a LoRA update exported to HF.

Kept to one trainer build (~10 s) and two short samples.
"""

from __future__ import annotations

import pytest
import torch

from backend.delta import save_peft_adapter
from backend.trainer import Trainer, TrainerConfig
from backend.trainer.tp_check import fixed_samples, full_logits

pytestmark = [pytest.mark.real_model, pytest.mark.filterwarnings("ignore::UserWarning")]
torch.set_num_threads(1)


def test_real_model_conversion_and_lora_export_match_hf(real_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tr = Trainer(TrainerConfig(repetition_guard=False, delta_dtype="fp32", lr=1e-3, epochs=1, w_loops=0.0), model_path=real_model_dir)
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Give me one tip for sleeping better."}]
    ids = tr.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(str(real_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0]
    mine = full_logits(tr, ids)
    assert float((mine - ref).abs().max()) < 1e-4
    assert torch.equal(mine.argmax(-1), ref.argmax(-1))

    report = tr.update(fixed_samples(tr.tokenizer))
    assert report.version == 1
    trained = full_logits(tr, ids)
    folder = save_peft_adapter(tr.export_delta(), tmp_path / "adapter")
    with torch.no_grad():
        got = PeftModel.from_pretrained(hf, str(folder)).eval()(input_ids=torch.tensor([ids])).logits[0]
    assert float((trained - ref).abs().max()) > 1e-3
    assert float((got - trained).abs().max()) < 1e-4


def test_two_training_threads_train_exactly_as_one(real_model_dir):
    """The replay gives its backend two threads (serving idles while it trains) and counts on the
    update being the same bit for bit, which is measured here rather than promised by torch.
    (Serving on two threads does change a replay: docs/replay.md, Session 11.)"""
    trained = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.get_num_threads() == n
            tr = Trainer(TrainerConfig(repetition_guard=False, epochs=1, w_loops=0.0), model_path=real_model_dir)
            report = tr.update(fixed_samples(tr.tokenizer))
            assert report.accepted and report.kl is not None  # the default KL anchor's base pass ran too
            trained.append({k: p.detach().clone() for k, p in tr.trainable.items()})
    finally:
        torch.set_num_threads(1)
    one, two = trained
    assert any(float(p.abs().max()) > 0 for k, p in one.items() if "lora_b" in k.lower())  # it did learn
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
