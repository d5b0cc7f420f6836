"""One module per `companion` subcommand.

Each module defines ``register(subparsers, common)`` which adds its parser
(with ``parents=[common]`` so global options such as ``--model`` work anywhere)
and sets ``func`` to a callable ``(args) -> int``. :mod:`companion.cli` finds
the modules here by name; adding a command means adding a file.
"""
