"""User-facing errors: the CLI prints their message as one sentence, never a traceback."""


class UserError(Exception):
    """A mistake the person can fix (bad input, missing model, unreachable backend)."""
