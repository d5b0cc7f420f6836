"""TP equivalence probe: ``torchrun --nproc_per_node K -m backend.trainer.tp_check --model DIR --out FILE``.

Every rank builds a Trainer with TP=K (world size K), computes full-vocabulary
logits on a fixed chat prompt, runs one update on fixed samples, computes the
logits again and (rank 0) saves ``{"logits_before", "loss", "logits_after",
"delta"}`` with ``torch.save``. Run it with K=1 and K=3 and compare: the test
``tests/test_trainer_tp.py`` and ``scripts/train_demo.py`` do.
"""

from __future__ import annotations

import argparse
import os

import torch


def fixed_samples(tokenizer):
    from backend.samples import Sample

    def mk(i, q, a, r, hint=None):
        msgs = [{"role": "user", "content": q}]
        p = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        ids = tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        t = None
        if hint:
            from backend.samples import chat_ids, hinted_messages

            t = chat_ids(tokenizer, hinted_messages(msgs, hint))
        return Sample(f"t{i}", "u", list(p), ids, None, r, hint, t, 0)

    return [
        mk(0, "What is 2+2?", "2+2 equals 4.", 1),
        mk(1, "Name a color.", "Blue is a lovely color, and so is green.", -1, "Answer in one word."),
    ]


@torch.no_grad()
def full_logits(trainer, ids: list[int]) -> torch.Tensor:
    """Full-vocabulary logits [s, v] on every rank (gathers the vocab shards)."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    x = torch.tensor([ids])
    logits = trainer._logits(x)  # [1, s, v/tp]
    return gather_from_tensor_model_parallel_region(logits)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="lora")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from backend.trainer import Trainer, TrainerConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = TrainerConfig(tp=world, mode=args.mode, repetition_guard=False, epochs=1, lora_rank=4, lr=1e-3,
                        delta_dtype="fp32")
    tr = Trainer(cfg, model_path=args.model)
    prompt = tr.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                              add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    before = full_logits(tr, prompt)
    report = tr.update(fixed_samples(tr.tokenizer))
    after = full_logits(tr, prompt)
    delta = tr.export_delta()
    if tr.rank == 0:
        torch.save({"logits_before": before, "loss": report.loss, "logits_after": after,
                    "delta": delta.tensors if args.mode == "lora" else {}}, args.out)
    shutdown_parallel()


def shutdown_parallel() -> None:
    """Leave the process groups before the interpreter exits.

    Exiting with gloo groups still alive let a rank die in teardown ("terminate called without an
    active exception", SIGABRT) once in a few CI runs, after its work was done: the ranks wait for
    each other, then megatron's groups and the default group are destroyed in order."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        dist.barrier()
        ps.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
