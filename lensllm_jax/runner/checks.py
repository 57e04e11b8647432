"""Everything `lensllm run` checks before any fine-tuning: candidates (path, config, every
tensor's header entry, tokenizer, position table, content digest), sizes, counts, methods
and the output folder. A problem is one `LensLLMInputError` line; nothing has been written
yet.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lensllm_jax.data._files import check_output_target, file_kind, open_regular
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
    "clean_name",
    "content_digest",
    "first_line",
    "is_leftover",
]

NTK_METHOD = "LensLLM-NTK"
MANIFEST = "manifest.json"
MIN_SIZES = 3  # a law with 3-4 parameters needs at least 3 curve points
LEARNED_POSITIONS = ("gpt2", "opt")  # families with a position table (no RoPE)
OUTPUTS = ("curves.csv", "ntk_features.csv", "ranking.csv", "report.json")


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _inspect(path: str, max_length: int | None) -> tuple[str, str, int, Any, tuple[Path, ...]]:
    """(location, model_type, vocab_size, tokenizer loader or None, files) without reading
    tensor data (`models.inspect`: config, every tensor's header entry against it). Raises
    `LensLLMInputError` (one line naming the candidate) for a missing path, a folder without
    config.json or weights, a config the zoo cannot run, a weight file that does not match
    it, a position table shorter than `max_length`."""
    from lensllm_jax import models

    try:
        info = models.inspect(path)
    except (ModelLoadError, OSError, RecursionError) as err:  # a broken config or header
        msg = first_line(err)
        prefixes = (str(path), str(Path(path).expanduser()))
        inside = msg.startswith(tuple(p.rstrip(os.sep) + os.sep for p in prefixes))
        for prefix in prefixes:
            if msg.startswith(prefix + ":"):
                msg = msg[len(prefix) + 1 :].strip()
        missing = not Path(path).expanduser().exists()
        hint = "give a Hugging Face model folder, a .gguf file or a cached repo id"
        raise LensLLMInputError(  # a file inside the candidate's folder names it already
            msg, file=None if inside else path, hint=hint if missing else None
        ) from None
    cfg = info.config
    if (
        max_length is not None
        and cfg.family in LEARNED_POSITIONS
        and cfg.max_position_embeddings < max_length
    ):
        raise LensLLMInputError(
            f"its position table has {cfg.max_position_embeddings} rows, fewer than the "
            f"{max_length} tokens of --max-length",
            file=path,
            hint=f"give --max-length {cfg.max_position_embeddings} or less",
        )
    location = str(info.location.resolve())
    return location, cfg.model_type, cfg.vocab_size, info.tokenizer_loader, info.files


def content_digest(files: Sequence[Path], root: Path | None = None) -> str:
    """SHA-256 over each file's name (relative to `root`), size and SHA-256 of its bytes:
    what a resume compares to know a candidate's files are unchanged. Each file must be a
    regular file. Cost: one full read of every file (hashlib's SHA-256; see README)."""
    total = hashlib.sha256()
    for f in sorted(files, key=str):
        fd, size = open_regular(f, what="model file")
        try:
            with os.fdopen(fd, "rb", closefd=False) as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError as err:
            raise LensLLMInputError(f"cannot read ({err.strerror})", file=f) from None
        finally:
            os.close(fd)
        name = os.path.relpath(f, root) if root is not None else Path(f).name
        total.update(f"{name}\0{size}\0{digest}\n".encode("utf-8", "backslashreplace"))
    return total.hexdigest()


def _display(given: str, location: str) -> str:
    """A repo id as given; else the resolved path, without a .gguf suffix."""
    if not Path(given).expanduser().exists():
        return given  # a repo id from the local HF cache
    return location[: -len(".gguf")] if location.endswith(".gguf") else location


def clean_name(part: str) -> str:
    """A path part as a display name: surrounding whitespace dropped, control characters
    and undecodable bytes (surrogate escapes) written as escapes (a newline as the two
    characters backslash n), so that a name is one printable line every output can hold."""
    part = part.strip()
    out = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in part)
    return out or "model"


def _unique_names(paths: Sequence[str]) -> list[str]:
    """Display names: the last path part, with parent parts added until all are unique
    (each part cleaned by `clean_name`; a clash that remains gets a #2, #3 ... suffix)."""
    split = [Path(os.path.normpath(str(p))) for p in paths]
    parts = [
        tuple(clean_name(x) for x in (q.parts[1:] if q.anchor else q.parts) or (str(q),))
        for q in split
    ]
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
            seen: dict[str, int] = {}
            for i, n in enumerate(names):
                seen[n] = seen.get(n, 0) + 1
                names[i] = n if seen[n] == 1 else f"{n}#{seen[n]}"
            return names


def check_candidates(paths: Sequence[str], *, max_length: int | None = None) -> list[Candidate]:
    """Check every candidate completely before any work: path, config, every tensor's name,
    dtype, shape and byte range against the headers (no tensor data is read), the position
    table against `max_length`, the tokenizer; and take each one's `content_digest`.

    Raises `LensLLMInputError` (one line naming the candidate, the file and the field) for
    a missing path, an unsupported or broken config, a weight file that does not match it,
    no tokenizer, or the same model given twice. Cost: one config, header and tokenizer
    load per candidate, and one read of its files for the digest.
    """
    if not paths:
        raise LensLLMInputError("no candidate models", hint="give --models PATH [PATH ...]")
    inspected = [(str(p), *_inspect(str(p), max_length)) for p in paths]
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
    for name, (given, location, model_type, vocab, loader, files) in zip(
        names, inspected, strict=True
    ):
        try:
            location.encode("utf-8")
        except UnicodeEncodeError:
            raise LensLLMInputError(
                "its path holds bytes that are not UTF-8, which the tokenizer library cannot open",
                file=given,
                hint="rename the file or folder with a UTF-8 name",
            ) from None
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
        root = Path(location) if Path(location).is_dir() else Path(location).parent
        digest = content_digest(files, root)
        out.append(Candidate(name, given, location, model_type, int(vocab), tok, digest))
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


_PART = re.compile(r"\..+\.part")  # a temp file of `write_atomic` left by a killed run


def is_leftover(path: Path) -> bool:
    """What a run killed before writing its manifest can leave: `write_atomic` temp files
    (``.NAME.XXXX.part``) and an empty (or temp-files-only) ``candidates`` folder."""
    if path.is_symlink():
        return False
    if path.is_file():
        return bool(_PART.fullmatch(path.name))
    if path.is_dir() and path.name == "candidates":
        return all(is_leftover(p) and p.is_file() for p in path.iterdir())
    return False


def check_out_dir(out_dir: Path) -> None:
    """The folder is new, empty, a previous run's (has a manifest), or what a run killed
    before its manifest left (`is_leftover`: recovered, not refused); its parent writable.
    Something that is not a folder is refused, and so is a manifest that is not a file."""
    if (out_dir.exists() and not out_dir.is_dir()) or (
        out_dir.is_symlink() and not out_dir.exists()
    ):
        try:
            kind = file_kind(os.stat(out_dir).st_mode)
        except OSError:
            kind = "a broken symbolic link"
        raise LensLLMInputError(
            f"is {kind}, not a folder", file=out_dir, hint="give --out-dir a new folder name"
        )
    if out_dir.is_dir():
        manifest = out_dir / MANIFEST
        if manifest.exists() or manifest.is_symlink():
            st = os.stat(manifest) if manifest.exists() else None
            if st is None or not stat.S_ISREG(st.st_mode):
                kind = "a broken symbolic link" if st is None else file_kind(st.st_mode)
                raise LensLLMInputError(
                    f"its {MANIFEST} is {kind}, not a regular file",
                    file=out_dir,
                    hint="give --out-dir a new folder name",
                )
            for name in OUTPUTS:  # what the run will replace: refused now, not at the end
                check_output_target(out_dir / name, flag="--out-dir")
        elif not all(is_leftover(p) for p in out_dir.iterdir()):
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
