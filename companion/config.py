"""Typed settings for companion: dataclasses with help text, a TOML file, and env vars.

Precedence (later wins): defaults < TOML file < environment < command-line flags.

- TOML file: ``$COMPANION_CONFIG`` or ``~/.config/companion/config.toml``; its
  top-level keys are the field names of :class:`Settings` (``cache_dir = "..."``).
- Environment: ``COMPANION_<FIELD>`` in upper case, e.g. ``COMPANION_CACHE_DIR``.

Every field carries ``metadata["help"]``; ``companion --help`` and the docs are
generated from it. Invalid values raise :class:`ConfigError` with one sentence.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Nothing is ever fetched from a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from companion.errors import UserError


# The chat's sampling temperature, also the replay's for its training turns (one measured setting).
CHAT_TEMPERATURE = 0.5


class ConfigError(UserError):
    """A user-facing configuration mistake; the message is one clear sentence."""


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class Settings:
    cache_dir: Path = _help(
        "Folder for the converted default model and other caches.",
        default=Path("~/.cache/companion"),
    )
    data_dir: Path = _help(
        "Folder for the journal (companion.db), runs and keys.",
        default=Path("~/.local/share/companion"),
    )
    model: str | None = _help(
        "A local Hugging Face Llama-family model folder; empty means the default "
        "SmolLM2-135M-Instruct from the cache (run `companion model fetch`).",
        default=None,
    )
    dtype: str = _help("Serving precision: 'bf16' (default, ~2x faster on CPU) or 'fp32'.", default="bf16")
    threads: int = _help("Torch threads for serving; 0 means all cores.", default=0)
    max_new_tokens: int = _help("Longest reply, in tokens.", default=256)
    temperature: float = _help(
        "Sampling temperature; 0 means greedy decoding. 0.5: the replies a person reacts to are what the "
        "policy learns from, and sampled at 0.5 (with the trainer's KL anchor 0.2) the student replay learned "
        "more and never lost variety, where 0.7 did on 5 of 9 seeds (docs/replay.md, Session 10).",
        default=CHAT_TEMPERATURE)
    top_p: float = _help("Nucleus sampling: keep the smallest token set with this much probability.", default=0.9)
    system_prompt: str = _help(
        "System message for every chat. It never contains learned preferences: "
        "learning goes through the weights.",
        default="You are a helpful assistant.",
    )
    backend: str | None = _help(
        "ZeroMQ endpoint of a running backend (tcp://host:port); empty starts a local one.",
        default=None,
    )

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir).expanduser()
        self.data_dir = Path(self.data_dir).expanduser()
        if self.dtype not in ("bf16", "fp32"):
            raise ConfigError(f"dtype must be 'bf16' or 'fp32', not {self.dtype!r}.")
        if self.threads < 0:
            raise ConfigError("threads must be 0 (all cores) or a positive number.")
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be at least 1.")
        if self.temperature < 0:
            raise ConfigError("temperature must be 0 (greedy) or positive.")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p must be in (0, 1].")
        if self.model == "":
            self.model = None

    @property
    def model_cache_dir(self) -> Path:
        """Where the converted default model lives."""
        return self.cache_dir / "models" / "SmolLM2-135M-Instruct"

    @property
    def journal_path(self) -> Path:
        return self.data_dir / "companion.db"


def _coerce(f: dataclasses.Field, raw: Any) -> Any:
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if raw is None:
        return None
    try:
        if "int" in typ and "Path" not in typ and not isinstance(raw, bool):
            return int(raw)
        if "float" in typ:
            return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {f.name} expects a number, got {raw!r}.") from None
    return raw


def config_file_path() -> Path:
    return Path(os.environ.get("COMPANION_CONFIG", "~/.config/companion/config.toml")).expanduser()


def load_settings(**overrides: Any) -> Settings:
    """Build settings from defaults, the TOML file, env vars and ``overrides`` (None = unset)."""
    values: dict[str, Any] = {}
    names = {f.name: f for f in dataclasses.fields(Settings)}
    path = config_file_path()
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}.") from None
        for key, val in data.items():
            if key not in names:
                raise ConfigError(f"config file {path} has an unknown setting {key!r}.")
            values[key] = _coerce(names[key], val)
    for name, f in names.items():
        env = os.environ.get(f"COMPANION_{name.upper()}")
        if env is not None:
            values[name] = _coerce(f, env)
    for key, val in overrides.items():
        if val is not None:
            values[key] = _coerce(names[key], val)
    return Settings(**values)
