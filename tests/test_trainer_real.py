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

    tr = Trainer(TrainerConfig(repetition_guard=False, delta_dtype="fp32", lr=1e-3, epochs=1), model_path=real_model_dir)
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
