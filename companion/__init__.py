"""companion: a terminal chat companion that learns from how you react to it."""

__version__ = "0.1.0"
