"""Serving engines: ``local`` (transformers on CPU) and ``sglang`` (HTTP to an SGLang server)."""
