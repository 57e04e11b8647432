"""Everything `lensllm run` checks before any fine-tuning: candidates (path, config,
tokenizer), sizes, counts, methods and the output folder. A problem is one
`LensLLMInputError` line; nothing has been written yet.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lensllm_jax.errors import LensLLMInputError, ModelLoadError
from lensllm_jax.runner.result import Candidate

__all__ = [
    "MANIFEST",
    "MIN_SIZES",
    "NTK_METHOD",
    "check_candidates",
    "check_methods",
    "check_out_dir",
    "check_positive_int",
    "check_sizes",
    "first_line",
]

NTK_METHOD = "LensLLM-NTK"
MANIFEST = "manifest.json"
MIN_SIZES = 3  # a law with 3-4 parameters needs at least 3 curve points


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _inspect(path: str) -> tuple[str, str, int, Callable[[], Any] | None]:
    """(location, model_type, vocab_size, tokenizer loader or None) without reading weights
    (`models.inspect`). Raises `LensLLMInputError` (one line naming the candidate) for a
    missing path, a folder without config.json or weights, a config the model zoo cannot
    run, an unreadable GGUF file."""
    from lensllm_jax import models

    try:
        info = models.inspect(path)
    except (ModelLoadError, OSError) as err:  # a broken config or GGUF, or unreadable
        msg = first_line(err)
        for prefix in (str(path), str(Path(path).expanduser())):
            if msg.startswith(prefix + ":"):
                msg = msg[len(prefix) + 1 :].strip()
        missing = not Path(path).expanduser().exists()
        hint = "give a Hugging Face model folder, a .gguf file or a cached repo id"
        raise LensLLMInputError(msg, file=path, hint=hint if missing else None) from None
    cfg = info.config
    return str(info.location.resolve()), cfg.model_type, cfg.vocab_size, info.tokenizer_loader


def _display(given: str, location: str) -> str:
    """A repo id as given; else the resolved path, without a .gguf suffix."""
    if not Path(given).expanduser().exists():
        return given  # a repo id from the local HF cache
    return location[: -len(".gguf")] if location.endswith(".gguf") else location


def _unique_names(paths: Sequence[str]) -> list[str]:
    """Display names: the last path part, with parent parts added until all are unique."""
    parts = [Path(os.path.normpath(str(p))).parts or (str(p),) for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(pp[-d:]) for pp, d in zip(parts, depth, strict=True)]
        clash = {n for n in names if names.count(n) > 1}
        if not clash:
            return names
        grown = False
        for i, n in enumerate(names):
            if n in clash and depth[i] < len(parts[i]):
                depth[i] += 1
                grown = True
        if not grown:
            return names


def check_candidates(paths: Sequence[str]) -> list[Candidate]:
    """Check every candidate before any work: path, config, weights and tokenizer.

    Reads configs and tokenizers only (no weights). Raises `LensLLMInputError` (one line
    naming the candidate) for a missing path, an unsupported or broken config, missing
    weights, no tokenizer, or the same model given twice. Cost: one config and one
    tokenizer load per candidate.
    """
    if not paths:
        raise LensLLMInputError("no candidate models", hint="give --models PATH [PATH ...]")
    inspected = [(str(p), *_inspect(str(p))) for p in paths]
    seen: dict[str, str] = {}
    for given, location, *_ in inspected:
        if location in seen:
            raise LensLLMInputError(
                f"the same model as {seen[location]!r}",
                file=given,
                hint="give each candidate once",
            )
        seen[location] = given
    names = _unique_names([_display(given, loc) for given, loc, *_ in inspected])
    out = []
    for name, (given, location, model_type, vocab, loader) in zip(names, inspected, strict=True):
        if loader is None:
            raise LensLLMInputError(
                "has no tokenizer (tokenizer.json / tokenizer_config.json / vocab.json / "
                "tokenizer.model, or GGUF tokenizer metadata)",
                file=given,
                hint="save the model's tokenizer beside it: tokenizer.save_pretrained(PATH)",
            )
        try:
            tok = loader()
        except ModuleNotFoundError as err:
            raise LensLLMInputError(
                f"cannot load its tokenizer: {err.name} is not installed",
                file=given,
                hint="pip install 'lensllm-jax[run]'",
            ) from None
        except Exception as err:  # transformers raises many types for a broken tokenizer
            raise LensLLMInputError(
                f"cannot load its tokenizer ({type(err).__name__}: {first_line(err)})",
                file=given,
                hint="check the tokenizer files, or save them again with save_pretrained",
            ) from None
        out.append(Candidate(name, given, location, model_type, int(vocab), tok))
    return out


def check_sizes(sizes: Sequence[Any]) -> tuple[int, ...]:
    out = []
    for s in sizes:
        v = float(s)
        if not (math.isfinite(v) and v.is_integer() and v >= 1):
            raise LensLLMInputError(
                f"subset size {s!r} is not a whole number >= 1",
                hint="give --sizes as sample counts, e.g. --sizes 200 400 800 1600",
            )
        out.append(int(v))
    if len(set(out)) != len(out):
        raise LensLLMInputError(
            f"subset sizes {out} repeat a size", hint="give each --sizes value once"
        )
    if len(out) < MIN_SIZES:
        raise LensLLMInputError(
            f"{len(out)} subset sizes given, need at least {MIN_SIZES}",
            hint="give --sizes at least three sizes, e.g. --sizes 200 400 800 1600",
        )
    return tuple(sorted(out))


def check_positive_int(value: Any, what: str, flag: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LensLLMInputError(
            f"{what} {value!r} must be a whole number >= {minimum}", hint=f"fix {flag}"
        )
    return int(value)


def check_methods(methods: Sequence[str] | None, ntk: bool) -> list[str]:
    """The methods to rank with: the given ones (default LensLLM), plus LensLLM-NTK unless
    `ntk` is off. An unknown name, or an NTK method with `ntk` off, fails here."""
    from lensllm_jax.selection.registry import DEFAULT_METHODS, resolve_methods

    chosen = list(dict.fromkeys(DEFAULT_METHODS if methods is None else methods))
    needing = [m.name for m in resolve_methods(chosen).values() if m.needs_ntk]
    if needing and not ntk:
        raise LensLLMInputError(
            f"method {needing[0]!r} needs NTK features", hint="drop --no-ntk or the method"
        )
    return [*chosen, NTK_METHOD] if ntk and NTK_METHOD not in chosen else chosen


def check_out_dir(out_dir: Path) -> None:
    """The folder is new, empty, or a previous run's (has a manifest); its parent writable."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LensLLMInputError(
            "exists and is not a folder", file=out_dir, hint="give --out-dir a new folder name"
        )
    if out_dir.is_dir():
        if not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()):
            raise LensLLMInputError(
                "is not empty and holds no lensllm run (no manifest.json)",
                file=out_dir,
                hint="give --out-dir a new or empty folder",
            )
        if not os.access(out_dir, os.W_OK):
            raise LensLLMInputError("folder is not writable", file=out_dir)
        return
    parent = out_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise LensLLMInputError(
            f"cannot create it ({str(parent)!r} is not a writable folder)", file=out_dir
        )
