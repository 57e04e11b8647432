"""The ``lensllm`` command: `main` parses and dispatches; `render` turns results into text."""

from lensllm_jax.cli.main import main

__all__ = ["main"]
