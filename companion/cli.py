"""`companion` command line: discovers one subcommand per module in companion/commands/.

Errors the person can fix (:class:`companion.errors.UserError`) print one sentence
and exit 2; nothing else is caught, so real bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from companion import __version__
from companion.errors import UserError


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand accepts (argparse parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("global options")
    g.add_argument("--model", metavar="PATH", help="a local Hugging Face Llama-family model folder (default: the converted SmolLM2-135M-Instruct)")
    g.add_argument("--cache-dir", metavar="DIR", help="cache folder (default ~/.cache/companion, env COMPANION_CACHE_DIR)")
    g.add_argument("--data-dir", metavar="DIR", help="journal and runs folder (default ~/.local/share/companion, env COMPANION_DATA_DIR)")
    return common


def build_parser() -> argparse.ArgumentParser:
    import companion.commands as pkg

    parser = argparse.ArgumentParser(
        prog="companion",
        description="A terminal chat companion that gets better simply by being used: "
        "your next message is the feedback, a learning backend updates the weights while you chat.",
    )
    parser.add_argument("--version", action="version", version=f"companion {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = common_options()
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"companion.commands.{info.name}")
        module.register(sub, common)
    return parser


def settings_from_args(args: argparse.Namespace, **extra):
    """Settings with the global options applied (flags win over env and file)."""
    from companion.config import load_settings

    return load_settings(
        model=getattr(args, "model", None),
        cache_dir=getattr(args, "cache_dir", None),
        data_dir=getattr(args, "data_dir", None),
        **extra,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"companion: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
