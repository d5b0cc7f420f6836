"""Local serving engine: a Hugging Face Llama-family model decoded on the CPU.

Contract
- ``generate(messages, params, on_token, cancel)`` applies the chat template,
  decodes with a KV cache, calls ``on_token(text_piece)`` as text is produced,
  stops on eos, ``max_new_tokens`` or ``cancel.set()``, and returns a :class:`Reply`
  holding the text, the exact sampled token ids, their log-probs, the prompt token
  ids and the policy version that produced it.
- Log-probs are ``log p(a_t | s, a_<t)`` under the serving policy at temperature 1
  (the distribution the trainer recomputes), whatever temperature sampled them.
- A reply that stopped on eos (``finish_reason == 'eos'``) ends its ``token_ids`` with that
  eos id and its log-prob: ending is a sampled decision like any other token, and the
  trainer must see it (a reply judged too short, or a non-answer, is judged *for stopping
  there*; without the eos token no gradient reaches that choice). The text never shows it.
- ``generate_greedy_batch`` decodes several prompts at once with left padding and
  explicit position ids; its replies equal one-by-one greedy replies (tested).
- ``apply_delta`` installs a new policy version by copying into the parameters that
  already exist (no reallocation, no model reload). It takes the same lock as
  generation, so a generation in flight finishes on the version it started with and
  the new version serves from the next generation on. A refused delta (stale
  version, wrong base version, wrong base model, bad checksum, unknown tensor)
  raises :class:`backend.delta.DeltaError` and the current version keeps serving.
- LoRA deltas are validated and installed in a few milliseconds; folding the factors
  into the weights (``W = base + scale * B @ A``, ~100 ms for SmolLM2 at r16 on this
  CPU, a rank-r product over every weight) happens after ``apply_delta`` returns: a
  background thread folds layer by layer while the engine is idle, and every
  generation first finishes whatever is left, under the generation lock. So no token
  is ever computed on half-folded weights, numerics do not depend on timing, and the
  fold costs the person nothing when it lands while they type (the usual case).
  :meth:`settle` folds what is pending now (for callers that read the weights).

Why a hand-written decode loop instead of ``model.generate``: we need the exact
sampled ids with their log-probs, cancellation between tokens, and bf16 speed; the
loop calls the model's own forward, so the model code stays the library's.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from backend.delta import Delta, DeltaError, unpack
from companion.engine import fastpath
from companion.engine.fastpath import FastLlama
from companion.models import model_fingerprint

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class GenParams:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    prompt_ids: list[int]
    version: int
    finish_reason: str  # 'eos' | 'length' | 'cancelled'
    messages: list[dict] = field(default_factory=list)
    ttft_s: float = 0.0  # prompt in -> first token out
    decode_s: float = 0.0  # time spent after the first token

    @property
    def decode_tok_s(self) -> float:
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


class _TextStreamer:
    """Turns a growing list of token ids into new text pieces.

    Decodes the whole reply each step (replies are short) and holds back a trailing
    U+FFFD so a multi-byte character split across tokens is emitted whole.
    """

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.emitted = ""

    def push(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece


class ReplyStream:
    """Iterator over text pieces of one generation; ``.result`` holds the Reply after it ends."""

    def __init__(self, engine: "LocalEngine", messages: list[dict], params: GenParams) -> None:
        self.cancel_event = threading.Event()
        self.result: Reply | None = None
        self._engine, self._messages, self._params = engine, messages, params

    def cancel(self) -> None:
        self.cancel_event.set()

    def __iter__(self) -> Iterator[str]:
        pieces: queue.Queue = queue.Queue()
        done = object()

        def run() -> None:
            try:
                self.result = self._engine.generate(
                    self._messages, self._params, on_token=pieces.put, cancel=self.cancel_event
                )
            finally:
                pieces.put(done)

        # Generation runs in a worker so the consumer can stop iterating early and cancel.
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        while (piece := pieces.get()) is not done:
            yield piece
        worker.join()


class LocalEngine:
    def __init__(
        self,
        model_path: str | Path,
        dtype: str = "bf16",
        threads: int = 0,
        fingerprint: str | None = None,
        use_fast_path: bool = True,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        if threads > 0:
            torch.set_num_threads(threads)
        self.model_path = Path(model_path)
        self.dtype = DTYPES[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_path), dtype=self.dtype)
        self.model.eval()
        self.model.requires_grad_(False)
        self.fast = FastLlama(self.model) if use_fast_path and fastpath.supported(self.model) else None
        self.fingerprint = fingerprint or model_fingerprint(self.model_path)
        self.version = 0
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._lock = threading.Lock()
        # fp32 copies of the base weights touched by LoRA deltas: W = base + scale * B @ A is
        # recomputed from these, so rounding never accumulates across versions.
        self._lora_base: dict[str, torch.Tensor] = {}
        self._scratch: dict[torch.Size, torch.Tensor] = {}  # fp32 merge buffers, one per weight shape
        self._params = dict(self.model.named_parameters())
        self._wide = self.fast.wide_params if self.fast is not None else {}  # HF name -> fp32 copy
        # LoRA folding state, guarded by self._lock. module -> (A [r, in], B [out, r], scale):
        # the adapter of the serving version (_lora_target) and the one the weights hold now
        # (_lora_merged); modules absent from a dict hold / want the base weight. Layers whose
        # modules differ are in _unfolded; generations fold them first (see module docstring).
        self._lora_target: dict[str, tuple] = {}
        self._lora_merged: dict[str, tuple] = {}
        self._unfolded: dict[str, None] = {}  # module names, insertion-ordered
        self._folder: threading.Thread | None = None
        self._fold_wanted = threading.Event()
        self.delta_history: list[dict] = []

    # ------------------------------------------------------------------ prompts
    def _eos_ids(self) -> list[int]:
        ids = set()
        for src in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(src)
        return sorted(ids)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)

    # ------------------------------------------------------------------ decoding
    @staticmethod
    def _choose(logits: torch.Tensor, params: GenParams, gen: torch.Generator | None) -> torch.Tensor:
        """logits [B, V] float32 -> token ids [B]."""
        if params.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / params.temperature, -1)
        if params.top_p < 1:
            sorted_p, idx = probs.sort(-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < params.top_p  # always keeps the top token
            sorted_p = sorted_p * keep
            choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)
            return idx.gather(-1, choice).squeeze(-1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    # ------------------------------------------------------------------ decoding core
    def _start(self, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, max_len: int,
               wide: bool | None = None):
        """Prefill: ids/valid/positions [B, P] -> (logits of last position [B, V], decode state).

        ``wide`` (fast path): True runs every step of this generation on the fp32 weights
        (batched evaluation: the same numerics whatever the batch size); None runs multi-row
        steps (the prefill) in fp32 and single-token steps in the serving dtype."""
        if self.fast is not None:
            cache = self.fast.new_cache(ids.shape[0], max_len)
            padded = bool((valid == 0).any())
            full_valid = torch.ones((ids.shape[0], max_len), dtype=torch.bool)
            full_valid[:, : ids.shape[1]] = valid.bool()
            logits = self.fast.forward(ids, positions, cache, full_valid if padded else None, wide=wide)
            return logits, {"cache": cache, "valid": full_valid if padded else None, "wide": wide}
        from transformers import DynamicCache

        state = {"cache": DynamicCache(), "mask": valid.long()}
        out = self.model(input_ids=ids, attention_mask=state["mask"], position_ids=positions,
                         past_key_values=state["cache"], use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float(), state

    def _step(self, state: dict, toks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step: toks/positions [B, 1] -> logits [B, V]."""
        if self.fast is not None:
            return self.fast.forward(toks, positions, state["cache"], state["valid"], wide=state["wide"])
        n = toks.shape[0]
        state["mask"] = torch.cat([state["mask"], torch.ones((n, 1), dtype=torch.long)], dim=1)
        out = self.model(input_ids=toks, attention_mask=state["mask"], position_ids=positions,
                         past_key_values=state["cache"], use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    def _keep_rows(self, state: dict, keep: list[int]) -> bool:
        """Drop finished rows from a batched decode state (fast path only; False = not done).

        Why: a batch decodes until its longest reply ends, so without this every finished row
        is still computed at every step. Rows are independent (own positions, own mask row,
        and the wide fp32 path gives a row the same result whatever the batch size, tested),
        so dropping them changes no reply."""
        if self.fast is None:
            return False
        idx = torch.tensor(keep)
        cache = state["cache"]
        cache.k, cache.v = cache.k.index_select(1, idx), cache.v.index_select(1, idx)  # [L, b, Hkv, T, D]
        if state["valid"] is not None:
            state["valid"] = state["valid"].index_select(0, idx)  # [b, T]
        return True

    @torch.inference_mode()
    def generate(
        self,
        messages: list[dict],
        params: GenParams | None = None,
        on_token: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Reply:
        params = params or GenParams()
        gen = None
        if params.seed is not None:
            gen = torch.Generator().manual_seed(params.seed)
        prompt = self.prompt_ids(messages)
        n_prompt = len(prompt)
        with self._lock:
            t0 = time.perf_counter()
            self._fold_pending()
            version = self.version
            out_ids: list[int] = []
            logps: list[float] = []
            streamer = _TextStreamer(self.tokenizer)
            stop = None  # (eos id, its log-prob) when the reply ends on eos
            finish = "length"
            t_first = None
            logits = state = None
            for step in range(params.max_new_tokens):
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                if state is None:
                    ids = torch.tensor([prompt])  # [1, P]
                    logits, state = self._start(ids, torch.ones_like(ids), torch.arange(n_prompt)[None],
                                                n_prompt + params.max_new_tokens)
                else:
                    logits = self._step(state, tok.view(1, 1), torch.tensor([[n_prompt + step - 1]]))
                tok = self._choose(logits, params, gen)  # [1]
                logp = torch.log_softmax(logits, -1)[0, tok[0]].item()
                t = int(tok[0])
                if t_first is None:
                    t_first = time.perf_counter()
                if t in self.eos_ids:
                    finish = "eos"
                    stop = (t, logp)
                    break
                out_ids.append(t)
                logps.append(logp)
                piece = streamer.push(out_ids)
                if piece and on_token is not None:
                    on_token(piece)
            t_end = time.perf_counter()
        text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
        if on_token is not None and len(text) > len(streamer.emitted) and text.startswith(streamer.emitted):
            on_token(text[len(streamer.emitted) :])
        t_first = t_first or t_end
        if stop is not None:
            out_ids, logps = out_ids + [stop[0]], logps + [stop[1]]
        return Reply(
            text=text,
            token_ids=out_ids,
            logprobs=logps,
            prompt_ids=prompt,
            version=version,
            finish_reason=finish,
            messages=[dict(m) for m in messages],
            ttft_s=t_first - t0,
            decode_s=t_end - t_first,
        )

    def stream(self, messages: list[dict], params: GenParams | None = None) -> ReplyStream:
        """``for piece in (s := engine.stream(msgs)): ...`` then ``s.result``; ``s.cancel()`` stops it."""
        return ReplyStream(self, messages, params or GenParams())

    @torch.inference_mode()
    def generate_greedy_batch(self, batch: list[list[dict]], max_new_tokens: int = 256) -> list[Reply]:
        """Greedy replies for several prompts at once (left padding, explicit positions).

        On the fast path with a bf16 model every step runs on the fp32 weight copy (bf16
        GEMMs with several rows are 3-5x slower than fp32 on this CPU), so a prompt's reply
        is the same whatever batch it is in; it may differ from :meth:`generate`'s greedy
        reply, which decodes in bf16, by the usual bf16 rounding."""
        if not batch:
            return []
        prompts = [self.prompt_ids(m) for m in batch]
        n, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)  # [B, P]
        valid = torch.zeros((n, width), dtype=torch.long)  # [B, P] 1 = real token
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            valid[i, width - len(p) :] = 1
        positions = (valid.cumsum(-1) - 1).clamp(min=0)  # [B, P]
        with self._lock:
            t0 = time.perf_counter()
            self._fold_pending()
            version = self.version
            outs: list[list[int]] = [[] for _ in range(n)]
            logps: list[list[float]] = [[] for _ in range(n)]
            done = [False] * n
            finish = ["length"] * n
            logits, state = self._start(ids, valid, positions, width + max_new_tokens, wide=True)
            positions = positions[:, -1:]  # [B, 1]
            rows = list(range(n))  # the prompt index of each row still in the batch
            for step in range(max_new_tokens):
                toks = logits.argmax(-1)  # [b]
                lp = torch.log_softmax(logits, -1).gather(-1, toks[:, None])[:, 0]
                for r, i in enumerate(rows):
                    if done[i]:
                        continue
                    t = int(toks[r])
                    outs[i].append(t)  # eos included, as in generate()
                    logps[i].append(float(lp[r]))
                    if t in self.eos_ids:
                        done[i], finish[i] = True, "eos"
                if all(done) or step == max_new_tokens - 1:
                    break
                keep = [r for r, i in enumerate(rows) if not done[i]]
                if len(keep) < len(rows) and self._keep_rows(state, keep):
                    rows, toks, positions = [rows[r] for r in keep], toks[keep], positions[keep]
                toks = torch.where(torch.tensor([done[i] for i in rows]), torch.full_like(toks, self.pad_id), toks)
                positions = positions + 1
                logits = self._step(state, toks[:, None], positions)
            elapsed = time.perf_counter() - t0
        return [
            Reply(
                text=self.tokenizer.decode(o[:-1] if f == "eos" else o, skip_special_tokens=True),
                token_ids=o, logprobs=lp_,
                prompt_ids=p, version=version, finish_reason=f, messages=[dict(x) for x in m],
                ttft_s=0.0, decode_s=elapsed,
            )
            for o, lp_, p, f, m in zip(outs, logps, prompts, finish, batch)
        ]

    # ------------------------------------------------------------------ weights
    def apply_delta(self, delta: Delta | tuple[dict, bytes]) -> int:
        """Install a new policy version between generations; returns the version now serving.

        Accepts a :class:`Delta` or the ``(header, payload)`` pair from the wire, whose
        sha256 is verified first. Raises DeltaError (current version keeps serving).
        A LoRA delta's factors are folded into the weights afterwards (see the module
        docstring); the next generation runs on the new version either way.
        """
        if isinstance(delta, tuple):
            delta = unpack(*delta)
        base_fp = delta.meta.get("base_fingerprint")
        if base_fp and base_fp != self.fingerprint:
            raise DeltaError(f"delta v{delta.version} is for base model {base_fp}, this engine serves {self.fingerprint}")
        with self._lock:
            if delta.version <= self.version:
                raise DeltaError(f"delta v{delta.version} is not newer than the serving version {self.version}")
            if not delta.absolute and delta.base_version != self.version:
                raise DeltaError(
                    f"delta v{delta.version} applies on v{delta.base_version}, but v{self.version} is serving"
                )
            t0 = time.perf_counter()
            if delta.format == "lora":
                self._install_lora(delta)
            else:
                self._fold_pending()  # a full delta writes weights: start from the folded version
                self._apply_full(delta)
            self.version = delta.version
            self.delta_history.append(
                {"version": delta.version, "format": delta.format, "apply_ms": (time.perf_counter() - t0) * 1e3}
            )
            if self._unfolded:
                self._start_folder()
                self._fold_wanted.set()
        return delta.version

    @torch.no_grad()
    def copy_weights_from(self, other: "LocalEngine") -> int:
        """Serve exactly what ``other`` serves now: its weights (LoRA folded), the fast path's
        fp32 copies and its version; returns that version. Both engines must hold the same
        base model in the same dtype. Used for evaluations beside serving (a snapshot that the
        serving engine's later deltas do not reach). The LoRA bookkeeping is shared by
        reference: its tensors are replaced, never written in place, so this engine can take
        the next delta as ``other`` would."""
        if other.fingerprint != self.fingerprint or other.dtype != self.dtype or set(other._wide) != set(self._wide):
            raise ValueError("copy_weights_from needs the same base model, dtype and serving path")
        with other._lock, self._lock:
            other._fold_pending()
            for name, p in self._params.items():  # fused fast-path tensors are views of these
                p.copy_(other._params[name])
            for name, w in self._wide.items():
                w.copy_(other._wide[name])
            self._lora_base = dict(other._lora_base)
            self._lora_target, self._lora_merged = dict(other._lora_target), dict(other._lora_merged)
            self._unfolded.clear()
            self.version = other.version
            return self.version

    def settle(self) -> float:
        """Fold any LoRA factors still pending into the weights now; returns the ms it took.

        Generations do this themselves; call it before reading weights directly."""
        with self._lock:
            t0 = time.perf_counter()
            self._fold_pending()
            return (time.perf_counter() - t0) * 1e3

    @property
    def folded(self) -> bool:
        """True when the weights hold the serving version (no LoRA factors pending)."""
        return not self._unfolded

    def _install_lora(self, delta: Delta) -> None:
        """Validate a LoRA delta and make its adapter the target; the weights are folded later."""
        pairs = delta.lora_pairs()
        scale = delta.lora_scaling
        target = {}
        for module, (a, b) in pairs.items():  # a [r, in], b [out, r]
            w = self._params.get(f"{module}.weight")
            if w is None:
                raise DeltaError(f"LoRA delta targets {module}, which this model does not have")
            if (b.shape[0], a.shape[1]) != tuple(w.shape) or a.shape[0] != b.shape[1]:
                raise DeltaError(f"LoRA factors for {module} do not fit its weight {tuple(w.shape)}")
            target[module] = (a, b, scale)
        # Validated everything before changing any state: a refused delta changes nothing.
        self._lora_target = target
        for module in set(target) | set(self._lora_merged):
            if self._lora_merged.get(module) is not target.get(module):
                self._unfolded[module] = None

    def _start_folder(self) -> None:
        if self._folder is None:
            self._folder = threading.Thread(target=self._fold_in_background, name="lora-fold", daemon=True)
            self._folder.start()

    def _fold_in_background(self) -> None:
        """Fold pending modules a few at a time, releasing the lock between them so a
        generation that wants to start waits at most one small step (it then folds the rest)."""
        while True:
            self._fold_wanted.wait()
            self._fold_wanted.clear()
            while self._unfolded:
                with self._lock:
                    for _ in range(7):  # about one layer per lock hold
                        if not self._unfolded:
                            break
                        self._fold(next(iter(self._unfolded)))
                time.sleep(0)  # let a waiting generation take the lock

    def _fold_pending(self) -> None:
        """Fold every pending module (caller holds the lock)."""
        while self._unfolded:
            self._fold(next(iter(self._unfolded)))

    @torch.no_grad()
    def _fold(self, module: str) -> None:
        """W = base + scale * B @ A (or the base) for one module (caller holds the lock)."""
        del self._unfolded[module]
        key = f"{module}.weight"
        w = self._params[key]
        wide = self._wide.get(key)  # the fast path's fp32 copy, if any
        base = self._lora_base.get(module)
        if base is None:  # first fold of this module: the live weight is still the base
            base = self._lora_base[module] = (wide if wide is not None else w).detach().float().clone()
        adapter = self._lora_target.get(module)
        if adapter is None:  # the serving adapter does not touch this module
            w.copy_(base)  # casts back to the serving dtype
            if wide is not None:
                wide.copy_(base)
            self._lora_merged.pop(module, None)
        else:
            a, b, scale = adapter
            # One fp32 addmm, rounded once into the live weight. fp32 because CPU bf16 GEMMs
            # with an inner size of r (8-16) are ~20x slower and a mixed bf16/fp32 in-place add
            # is ~6x slower than this addmm + cast copy (measured, docs/serving.md).
            if w.dtype == torch.float32:
                torch.addmm(base, b.float(), a.float(), alpha=scale, out=w)  # [out, in]
            else:
                # The fp32 result lands in the fast path's fp32 copy (or a scratch buffer)
                # and is rounded once into the serving weight.
                out = wide
                if out is None:
                    out = self._scratch.get(base.shape)
                    if out is None:
                        out = self._scratch[base.shape] = torch.empty(base.shape)
                torch.addmm(base, b.float(), a.float(), alpha=scale, out=out)  # [out, in] fp32
                w.copy_(out)
            self._lora_merged[module] = adapter

    @torch.no_grad()
    def _apply_full(self, delta: Delta) -> None:
        for name, t in delta.tensors.items():
            p = self._params.get(name)
            if p is None:
                if name == "lm_head.weight" and "model.embed_tokens.weight" in self._params:
                    continue  # tied embeddings: the embedding copy covers it
                raise DeltaError(f"full delta has tensor {name}, which this model does not have")
            if tuple(p.shape) != tuple(t.shape):
                raise DeltaError(f"full delta tensor {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        for name, t in delta.tensors.items():
            p = self._params.get(name)
            if p is not None:
                p.copy_(t)
                if name in self._wide:
                    self._wide[name].copy_(p)  # the fp32 copy holds exactly the serving weight
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                if module in self._lora_base:  # a full update redefines the base
                    self._lora_base[module] = t.detach().float().clone()
                # the tensor is now exactly the weight: no adapter is folded into it or pending
                self._lora_merged.pop(module, None)
                self._lora_target.pop(module, None)
                self._unfolded.pop(module, None)
