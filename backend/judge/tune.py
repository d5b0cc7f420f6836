"""Fine-tune the top layers of MiniLM on the follow-up bank (the CPU judge's encoder).

Contract: ``tuned_encoder(base, texts, labels, cfg, cache_dir) -> SentenceEncoder``,
a copy of ``base`` whose top ``cfg.layers`` transformer layers were trained to
separate the bank's labels (-1 / 0 / +1); the lower layers, the tokenizer and
the pooling are the base model's. The logistic-regression heads of the
embedding judge are then fitted on the tuned embeddings.

Why: frozen MiniLM puts "Great, it crashed again" next to "Great, it runs
now" (same words, same topic); the polarity of such messages is what the
judge got wrong. Training the top layers on the bank's labels moves the
sentence embedding towards stance rather than topic (measured in docs/judge.md).

Recipe (deterministic): the bank's messages pass through the frozen lower
layers once; the top layers plus a linear classifier on the mean-pooled,
L2-normalised embedding are trained with class-balanced cross-entropy
(AdamW, ``epochs`` passes, batch 32, no dropout), seeded, one torch thread,
``torch.use_deterministic_algorithms`` on (warn-only); the global RNG, thread
count and determinism flags are restored afterwards (they are process-wide:
other threads run with them during the fine-tuning). About a minute on one core
for the ~750-row bank with 3 layers.

Cached: the top layers' weights are saved under
``<cache_dir>/encoder-<hash>.pt`` (hash = sha256 of the bank file, the
recipe, ``TUNE_VERSION``, torch and transformers versions; 21 MB) and kept in
memory per process, so every judge in a process shares one tuned encoder. A
corrupt or stale file is retrained, never an error.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from backend.judge.encoder import SentenceEncoder

TUNE_VERSION = "tune-v1"   # bump when the recipe changes (invalidates cached encoders)
_MEMO: dict[str, SentenceEncoder] = {}


@dataclass(frozen=True)
class TuneConfig:
    layers: int = 2          # top transformer layers trained (MiniLM-L6 has 6)
    epochs: int = 6
    lr: float = 1e-4
    batch: int = 32
    seed: int = 0
    scale: float = 10.0      # logit scale of the linear classifier on unit-norm embeddings


def _key(train_path: Path, cfg: TuneConfig, base: SentenceEncoder) -> str:
    import torch
    import transformers

    from backend.judge.data import files_hash
    tag = json.dumps([TUNE_VERSION, asdict(cfg), base.key, base.max_length,
                      torch.__version__, transformers.__version__], sort_keys=True)
    return files_hash(train_path, extra=tag)


def _pooled(layers, states: list, torch) -> "torch.Tensor":
    """Run ``layers`` on per-text hidden states [len_i, d]; mean-pool, L2-normalise -> [B, d]."""
    d = states[0].shape[1]
    L = max(x.shape[0] for x in states)
    h = torch.zeros(len(states), L, d)
    mask = torch.zeros(len(states), L)
    for i, x in enumerate(states):
        h[i, :len(x)] = x
        mask[i, :len(x)] = 1
    ext = (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min   # additive attention mask
    for layer in layers:
        out = layer(h, attention_mask=ext)
        h = out[0] if isinstance(out, tuple) else out
    m = mask.unsqueeze(-1)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def train_top_layers(base: SentenceEncoder, texts: list[str], labels: list[int], cfg: TuneConfig) -> dict:
    """-> state dict of the trained top ``cfg.layers`` layers (keys relative to ``encoder.layer[-k:]``)."""
    import torch

    model = base.model
    n_layers = len(model.encoder.layer)
    if not 0 < cfg.layers <= n_layers:
        raise ValueError(f"layers must be in 1..{n_layers}")
    cut = n_layers - cfg.layers
    prev_det, prev_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    # warn_only: the flag is process-wide, and a trainer thread running meanwhile must not raise
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            states = []                                            # frozen lower layers, once
            with torch.inference_mode():
                for i in range(0, len(texts), 64):
                    chunk = texts[i:i + 64]
                    enc = base.tokenizer(chunk, padding=True, truncation=True,
                                         max_length=base.max_length, return_tensors="pt")
                    hs = model(**enc, output_hidden_states=True).hidden_states[cut]   # [B, L, d]
                    lens = enc["attention_mask"].sum(1).tolist()
                    states += [hs[j, :n].clone() for j, n in enumerate(lens)]
            top = copy.deepcopy(model.encoder.layer[cut:])
            top.train(False)                                       # no dropout: deterministic
            for p in top.parameters():
                p.requires_grad_(True)
            y = torch.tensor(np.asarray(labels) + 1)               # classes -1,0,1 -> 0,1,2
            head = torch.nn.Linear(states[0].shape[1], 3)
            counts = torch.bincount(y, minlength=3).float().clamp(min=1)
            weight = counts.sum() / (3 * counts)                   # class-balanced
            opt = torch.optim.AdamW(list(top.parameters()) + list(head.parameters()), lr=cfg.lr, weight_decay=0.01)
            gen = torch.Generator().manual_seed(cfg.seed)
            for _ in range(cfg.epochs):
                perm = torch.randperm(len(texts), generator=gen)
                for i in range(0, len(texts), cfg.batch):
                    idx = perm[i:i + cfg.batch]
                    e = _pooled(top, [states[j] for j in idx], torch)
                    loss = torch.nn.functional.cross_entropy(head(e) * cfg.scale, y[idx], weight=weight)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            return {k: v.detach().clone() for k, v in top.state_dict().items()}
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)


def with_top_layers(base: SentenceEncoder, state: dict, layers: int, key: str) -> SentenceEncoder:
    """A SentenceEncoder sharing ``base``'s tokenizer, with a model copy whose top layers are ``state``."""
    enc = copy.copy(base)
    enc.model = copy.deepcopy(base.model).eval()
    enc.model.encoder.layer[len(enc.model.encoder.layer) - layers:].load_state_dict(state)
    enc.key = key
    return enc


def tuned_encoder(base: SentenceEncoder, texts: list[str], labels: list[int], cfg: TuneConfig,
                  cache_dir: Path, train_path: Path) -> SentenceEncoder:
    import torch

    key = _key(train_path, cfg, base)
    if key in _MEMO:
        return _MEMO[key]
    path = Path(cache_dir) / f"encoder-{key}.pt"
    name = f"{base.key}+{key}"
    enc = None
    if path.exists():
        try:
            enc = with_top_layers(base, torch.load(path, weights_only=True), cfg.layers, name)
        except Exception:       # corrupt or foreign file: retrain, never crash the loop
            enc = None
    if enc is None:
        state = train_top_layers(base, texts, labels, cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{time.time_ns()}")
        torch.save(state, tmp)
        tmp.replace(path)       # atomic: concurrent judges never read half a file
        enc = with_top_layers(base, state, cfg.layers, name)
    _MEMO[key] = enc
    return enc
