"""The zoo's text, all of it already on the machine (nothing is downloaded), and its tokenizer.

Pretraining corpora (bytes, UTF-8):

- ``prose``: Debian's package documentation (``/usr/share/doc``: copyright files, READMEs,
  NEWS, changelogs, .txt/.md) and the licence texts of ``/usr/share/common-licenses``;
- ``pydoc``: the Python reference documentation that ships inside the standard library as
  ``pydoc_data.topics`` (English prose about Python);
- ``code``: the standard library's Python sources with every docstring removed (``ast``
  round trip), so that the downstream task's targets never appear in pretraining;
- ``mix``: half ``prose``, half ``code`` (interleaved in 64 KiB blocks).

Downstream task (another domain than most corpora: Python API documentation): prompt =
a standard-library function's signature, ``def module.name(args):`` plus a newline,
completion = the first line of its docstring. Pairs are deduplicated on the completion (a
repeated first line, e.g. "Close the file.", appears once), so no test completion is seen
in fine-tuning. The ``site`` source adds the docstrings of every package installed beside the
interpreter (numpy, scipy, jax, ... : more pairs for the GPU preset).

Every candidate shares one byte-level tokenizer (`ByteTokenizer`: 256 byte ids + BOS, EOS,
PAD), so a token is a byte, the shared unit is nats per byte, and no tokenizer is trained.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD = 256, 257, 258
VOCAB = 259
SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}


class ByteTokenizer:
    """UTF-8 bytes as token ids, with the interface `lensllm_jax.data.text.tokenize` uses:
    ``tok(texts, add_special_tokens=False)["input_ids"]``, bos/eos/pad ids, ``decode``."""

    bos_token_id = BOS
    eos_token_id = EOS
    pad_token_id = PAD
    is_fast = False

    def __call__(self, texts, add_special_tokens: bool = True, **_):
        single = isinstance(texts, str)
        ids = [list(t.encode("utf-8")) for t in ([texts] if single else texts)]
        if add_special_tokens:
            ids = [[BOS, *x] for x in ids]
        return {"input_ids": ids[0] if single else ids}

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.rglob("*.py") if not (SKIP_PARTS & set(p.relative_to(root).parts))
    )


def _site_files() -> list[Path]:
    roots = sorted({Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()})
    out: list[Path] = []
    for root in roots:
        out += sorted(
            p
            for p in root.rglob("*.py")
            if not ({"test", "tests", "testing", "_vendor"} & set(p.relative_to(root).parts))
        )
    return out


def _without_docstrings(source: str) -> str | None:
    """The module's code with every docstring removed (ast round trip; comments go too)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            if isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    try:
        return ast.unparse(tree)
    except (ValueError, RecursionError):
        return None


def _prose_texts() -> list[str]:
    texts = []
    lic = Path("/usr/share/common-licenses")
    files = sorted(p for p in lic.rglob("*") if p.is_file()) if lic.is_dir() else []
    doc = Path("/usr/share/doc")
    if doc.is_dir():
        for p in sorted(doc.rglob("*")):
            name = p.name.lower()
            if not p.is_file() or p.is_symlink():
                continue
            if (
                name == "copyright"
                or name.startswith(("readme", "news", "changelog"))
                or name.endswith((".txt", ".md"))
            ):
                files.append(p)
    for p in files:
        try:
            raw = p.read_bytes()
            if p.suffix == ".gz":
                raw = gzip.decompress(raw)
            texts.append(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
            continue
    return texts


def build_corpus(kind: str, max_bytes: int) -> bytes:
    """The corpus `kind` ("prose", "pydoc", "code", "mix") as bytes, at most `max_bytes`
    (files in sorted order, so the same machine gives the same bytes)."""
    if kind == "mix":
        a, b = build_corpus("prose", max_bytes // 2), build_corpus("code", max_bytes // 2)
        block = 1 << 16
        parts = []
        for i in range(0, max(len(a), len(b)), block):
            parts += [a[i : i + block], b[i : i + block]]
        return b"".join(parts)[:max_bytes]
    if kind == "prose":
        texts = _prose_texts()
    elif kind == "pydoc":
        import pydoc_data.topics as topics

        texts = [topics.topics[k] for k in sorted(topics.topics)]
    elif kind == "code":
        texts = []
        total = 0
        for p in _stdlib_files():
            code = _without_docstrings(p.read_text("utf-8", errors="replace"))
            if code:
                texts.append(code)
                total += len(code)
                if total >= max_bytes:
                    break
    else:
        raise ValueError(f"unknown corpus {kind!r}")
    return "\n\n".join(texts).encode("utf-8")[:max_bytes]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _signature(module: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = ast.unparse(node.args)
    return f"def {module}.{node.name}({args}):\n"


def task_pairs(
    source: str = "stdlib", min_len: int = 12, max_len: int = 100
) -> list[tuple[str, str]]:
    """(prompt, completion) pairs: `def module.function(signature):` -> the first line of its
    docstring, deduplicated on the completion, in file order. `source` "stdlib" or "site"
    (stdlib + site-packages). Cost: parses every source file once (seconds)."""
    files = _stdlib_files() + (_site_files() if source == "site" else [])
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for p in files:
        try:
            tree = ast.parse(p.read_text("utf-8"))
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue
        module = p.stem if p.stem != "__init__" else p.parent.name
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            first = doc.strip().split("\n")[0].strip()
            if not (min_len <= len(first) <= max_len) or first in seen:
                continue
            try:
                prompt = _signature(module, node)
            except (ValueError, RecursionError):
                continue
            seen.add(first)
            out.append((prompt, " " + first))
    return out
