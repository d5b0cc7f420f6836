"""User-facing errors: the CLI prints their message as one sentence, never a traceback."""


class UserError(Exception):
    """A mistake the person can fix (bad input, missing model, unreachable backend)."""


def run_script(main) -> None:
    """Exit with ``main()``'s code; a :class:`UserError` (an unknown persona, a bad flag value) is one
    line on stderr and exit code 2, never a traceback. The entry point of the probes in ``scripts/``."""
    import sys

    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
