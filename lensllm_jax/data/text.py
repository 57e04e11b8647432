"""A user's fine-tuning data: read examples, split them, draw nested subsets, tokenize.

    examples = textdata.read_examples("task.jsonl")           # list[Example(prompt, target)]
    split = textdata.split_examples(len(examples), num_test=200, num_probe=32, seed=0)
    data = textdata.tokenize(examples, model.tokenizer, max_length=256, name="gpt2")
    pool, test = data.take(split.pool), data.take(split.test)
    sub = textdata.nested_subset(np.arange(len(split.pool)), 400, seed=0)   # 200 ⊂ 400 ⊂ ...

Every candidate tokenizes the SAME examples with its own tokenizer; `TokenData.target_bytes`
(UTF-8 bytes of the target text that is scored) makes the losses of candidates with different
tokenizers comparable in nats per byte. No JAX here: numpy and the standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lensllm_jax.data._files import load_json, read_input
from lensllm_jax.errors import LensLLMInputError

__all__ = [
    "Example",
    "Split",
    "TokenData",
    "nested_subset",
    "python_doc_paragraphs",
    "read_examples",
    "split_examples",
    "tokenize",
]

_FORMATS_HINT = (
    'write one JSON object per line: {"text": ...} or {"prompt": ..., "completion": ...} '
    '(or {"input": ..., "output": ...})'
)
_MAX_DEPTH = 16  # an example is a flat object; other keys may nest a little
# (prompt key, target key) pairs accepted in a JSONL object, in the order they are tried.
_PAIRS = (("prompt", "completion"), ("input", "output"))


class Example(NamedTuple):
    """One training/test example; the loss is taken on `target` only, given `prompt`."""

    prompt: str
    target: str


class Split(NamedTuple):
    """Disjoint, sorted example indices: fine-tuning `pool`, held-out `test`, NTK `probe`."""

    pool: np.ndarray
    test: np.ndarray
    probe: np.ndarray


class TokenData(NamedTuple):
    """Tokenized examples, right-padded to a common length T.

    Attributes:
      tokens: (N, T) int32 token ids (pad id after the end of each example).
      loss_mask: (N, T) int32, 1 on the target tokens (scored given everything before them);
        0 on the context token, the prompt and the padding. Position 0 is never 1.
      attention_mask: (N, T) int32, 1 on real tokens.
      target_bytes: (N,) int64 UTF-8 bytes of the target text whose tokens are scored.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    attention_mask: np.ndarray
    target_bytes: np.ndarray

    @property
    def num_examples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_target_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def take(self, idx: np.ndarray | Sequence[int]) -> TokenData:
        """The examples at `idx` (in that order), same padded length T."""
        idx = np.asarray(idx, dtype=np.int64)
        return TokenData(*(np.asarray(a)[idx] for a in self))

    def batch(self, idx: np.ndarray | Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """`{"tokens", "loss_mask", "attention_mask"}` of the examples at `idx` (all if None),
        the batch format of `models.per_example_loss`."""
        d = self if idx is None else self.take(idx)
        return {"tokens": d.tokens, "loss_mask": d.loss_mask, "attention_mask": d.attention_mask}


# ---------------------------------------------------------------------------------------------
# Reading


def _read_text(path: Path) -> str:
    raw = read_input(
        path,
        kind="data file",
        missing_hint="check the data path",
        folder_hint="pass a .jsonl or .txt file",
    )
    try:
        return raw.decode("utf-8-sig")  # drops a UTF-8 BOM if there is one
    except UnicodeDecodeError as err:
        raise LensLLMInputError(
            f"not UTF-8 text (byte {err.start})", file=path, hint="save the file as UTF-8"
        ) from None


def _lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) of the non-blank lines; LF or CRLF.

    Split on "\\n" only: str.splitlines would also split inside a JSON string holding a raw
    U+2028 or form feed, which JSON allows.
    """
    out = []
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            out.append((i, line))
    return out


def _example_from_json(obj: Any, where: str) -> Example:
    def fail(what: str) -> LensLLMInputError:
        return LensLLMInputError(f"{where}: {what}", hint=_FORMATS_HINT)

    if not isinstance(obj, dict):
        raise fail(f"a JSON {type(obj).__name__}, not an object")
    schemes = [p for p in _PAIRS if p[0] in obj or p[1] in obj]
    if "text" in obj:
        schemes.append(("", "text"))
    if not schemes:
        keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
        raise fail(f"no 'text', 'prompt'/'completion' or 'input'/'output' key (keys: {keys})")
    if len(schemes) > 1:
        names = " and ".join("/".join(k for k in s if k) for s in schemes)
        raise fail(f"ambiguous: has both {names}; keep one")
    pk, tk = schemes[0]
    for k in (pk, tk) if pk else (tk,):
        if k not in obj:
            raise fail(f"has {(tk if k == pk else pk)!r} but no {k!r}")
        if not isinstance(obj[k], str):
            raise fail(f"{k!r} is a JSON {type(obj[k]).__name__}, not a string")
    if not obj[tk].strip():
        raise fail(f"{tk!r} is empty: nothing to learn or score")
    return Example(obj[pk] if pk else "", obj[tk])


def read_examples(path: str | PathLike[str]) -> list[Example]:
    """Read a data file into `Example`s, in file order.

    Formats (chosen by extension, case-insensitive):
      .jsonl: one JSON object per non-blank line, either {"text": t} (prompt "", target t) or
        {"prompt": p, "completion": c} / {"input": p, "output": c}; other keys are ignored.
      .txt: one example per non-blank line (prompt "", target = the line).
    UTF-8 with or without BOM, LF or CRLF line ends.

    Raises:
      LensLLMInputError: one line naming file and line for an unknown extension, a missing or
        empty file, a file that is not a regular file (a FIFO, a device: never read), bad
        JSON (also: nested deeper than 16, an integer of more than 64 digits, a lone
        surrogate in a string), a line that is not an object, missing/ambiguous keys, a
        value that is not a string, or an empty target.

    Cost: O(file size).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise LensLLMInputError(
            f"unknown data file type {path.suffix or '(no extension)'!r}",
            file=path,
            hint="use .jsonl (one JSON object per line) or .txt (one example per line)",
        )
    lines = _lines(_read_text(path))
    if not lines:
        raise LensLLMInputError(
            "empty file: no examples",
            file=path,
            hint=_FORMATS_HINT if suffix == ".jsonl" else "write one example per line",
        )
    if suffix == ".txt":
        return [Example("", line) for _, line in lines]
    out = []
    for n, line in lines:
        try:
            obj = load_json(line, where=path, max_depth=_MAX_DEPTH)
        except LensLLMInputError as err:  # bad syntax, too deep, a lone surrogate, ...
            raise LensLLMInputError(
                f"line {n}: {err.what}", file=path, hint=_FORMATS_HINT
            ) from None
        try:
            out.append(_example_from_json(obj, f"line {n}"))
        except LensLLMInputError as err:
            raise LensLLMInputError(err.what, file=path, hint=err.hint) from None
    return out


# ---------------------------------------------------------------------------------------------
# Splitting


def split_examples(n: int, *, num_test: int, num_probe: int, seed: int) -> Split:
    """Split example indices 0..n−1 into disjoint sorted (pool, test, probe).

    One permutation from `np.random.default_rng(seed)`: its first `num_test` entries are the
    test set, the next `num_probe` the probe set (for the NTK), the rest the fine-tuning pool.
    Raises LensLLMInputError unless num_test >= 1, num_probe >= 0 and the pool is non-empty.
    Cost: O(n).
    """
    if num_test < 1 or num_probe < 0:
        raise LensLLMInputError(
            f"need num_test >= 1 and num_probe >= 0 (got num_test={num_test}, "
            f"num_probe={num_probe})"
        )
    if n < num_test + num_probe + 1:
        raise LensLLMInputError(
            f"{n} example{'s are' if n != 1 else ' is'} too few for {num_test} test + "
            f"{num_probe} probe examples and a "
            f"non-empty fine-tuning pool",
            hint="provide more examples or lower the test/probe sizes",
        )
    perm = np.random.default_rng(seed).permutation(n)
    test = np.sort(perm[:num_test])
    probe = np.sort(perm[num_test : num_test + num_probe])
    pool = np.sort(perm[num_test + num_probe :])
    return Split(pool, test, probe)


def nested_subset(pool: np.ndarray | Sequence[int], size: int, *, seed: int) -> np.ndarray:
    """The first `size` entries of ONE seeded permutation of `pool`.

    The permutation depends only on (len(pool), seed), so for sizes s1 < s2 the subset of s1 is
    a prefix of the subset of s2: fine-tuning sets nest (200 ⊂ 400 ⊂ ...), as in Lin et al.
    Raises LensLLMInputError unless 1 <= size <= len(pool). Cost: O(len(pool)).
    """
    pool = np.asarray(pool)
    if int(size) != size or not 1 <= size <= len(pool):
        raise LensLLMInputError(
            f"subset size {size} is not an integer in 1..{len(pool)} (the pool size)",
            hint="use sizes no larger than the fine-tuning pool",
        )
    perm = np.random.default_rng(seed).permutation(len(pool))
    return pool[perm[: int(size)]]


# ---------------------------------------------------------------------------------------------
# Tokenizing


def _special_ids(tokenizer: Any) -> tuple[int | None, int | None, int]:
    """(context token prepended to an empty prompt, eos, pad).

    Context token as in lm-evaluation-harness: BOS if there is one, else EOS. Pad falls back
    to EOS, then 0 (padded positions are masked out of attention and loss, so any id works).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    start = bos if bos is not None else eos
    return start, eos, pad if pad is not None else (eos if eos is not None else 0)


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS first when called with its default special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _encode(
    tokenizer: Any, texts: list[str], offsets: bool
) -> tuple[list[list[int]], list[Any] | None]:
    """Token ids of each text (no special tokens) and, for fast tokenizers, char offsets."""
    if not texts:
        return [], []
    if offsets and getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [list(x) for x in enc["input_ids"]], list(enc["offset_mapping"])
    enc = tokenizer(texts, add_special_tokens=False)
    return [list(x) for x in enc["input_ids"]], None


def _kept_bytes(target: str, ids: list[int], offsets: Any, lo: int, hi: int, tokenizer) -> int:
    """UTF-8 bytes of the target text covered by target tokens lo..hi−1 (the scored ones).

    Token i owns the text from the end of token i−1 to its own end (so whitespace that
    offsets trim off belongs to the next token); the last token also owns any trailing text.
    All tokens scored: the whole target. Without offsets (slow tokenizers): the decoded kept
    tokens, minus the decoded unscored head.
    """
    n = len(ids)
    if lo == 0 and hi >= n:
        return len(target.encode("utf-8"))
    if offsets is not None:
        ends = [0] + [int(e) for _, e in offsets]
        ends[-1] = len(target)
        ends = np.maximum.accumulate(ends).tolist()  # offsets never go backwards
        return len(target[ends[lo] : ends[min(hi, n)]].encode("utf-8"))

    def dec(k: int) -> int:
        return len(tokenizer.decode(ids[:k]).encode("utf-8")) if k > 0 else 0

    return dec(min(hi, n)) - dec(lo)


def tokenize(
    examples: Sequence[Example], tokenizer: Any, *, max_length: int = 256, name: str = ""
) -> TokenData:
    """Tokenize examples for one candidate: `[start] + prompt + target + [eos]`, right-padded.

    - start: BOS when the tokenizer adds it by default; otherwise, when the prompt is empty, the
      BOS (or EOS) token as context, so the first target token is scored (lm-evaluation-harness
      convention). With neither token, the first target token is context and not scored.
    - prompt and target are tokenized separately (no special tokens) and concatenated, so the
      target's tokens are the same whatever the prompt (a SentencePiece-style tokenizer may
      then mark the target's start as a word start); EOS (if any) ends the target and is
      scored (it teaches the model to stop; it has 0 bytes).
    - a sequence longer than `max_length` first loses the beginning of its prompt (the start
      token stays; without one, one prompt token stays as context), so the scored target is
      kept whole whenever it fits; only a target longer than that loses its right end.
      `loss_mask` marks the target tokens that survive; `target_bytes` counts the UTF-8 bytes
      of the target text those tokens cover (from the fast tokenizer's character offsets;
      exact when nothing of the target is cut).
    - padded to the longest sequence (<= max_length) with the pad id (else EOS, else 0).

    nats per byte = Σ NLL over target tokens / Σ target_bytes is comparable across tokenizers.

    Raises:
      LensLLMInputError: `name`: example i has no scored target token left (suggests a larger
        max_length), or max_length < 2.

    Cost: one batched tokenizer call per field; O(N·T) assembly.
    """
    if max_length < 2:
        raise LensLLMInputError(
            f"max_length={max_length} is too small", file=name or None, hint="use >= 2"
        )
    start, eos, pad = _special_ids(tokenizer)
    always_start = _adds_bos(tokenizer)
    prompts, _ = _encode(tokenizer, [e.prompt for e in examples], offsets=False)
    targets, t_off = _encode(tokenizer, [e.target for e in examples], offsets=True)
    rows: list[tuple[list[int], int, int]] = []  # (ids, first scored position, end)
    nbytes = np.zeros(len(examples), np.int64)
    for i, ex in enumerate(examples):
        head = [start] if start is not None and (always_start or not ex.prompt) else []
        prompt = prompts[i]
        tgt = targets[i] + ([eos] if eos is not None else [])
        room = max_length - len(head) - len(tgt)  # prompt tokens that fit beside the target
        if room < len(prompt):  # too long: the prompt's beginning goes first
            keep = max(room, 0 if head or not prompt else 1)
            prompt = prompt[len(prompt) - keep :] if keep else []
        head += prompt
        ids = (head + tgt)[:max_length]  # the target's end goes only if it alone is too long
        # Target token j sits at position len(head)+j; position 0 is never scored.
        first = max(len(head), 1)
        if first >= len(ids):
            raise LensLLMInputError(
                f"example {i}: no target token is left to score after truncation to "
                f"max_length={max_length} (context {len(head)} + target {len(tgt)} tokens)",
                file=name or None,
                hint="raise max_length",
            )
        lo, hi = first - len(head), len(ids) - len(head)  # scored target tokens lo..hi-1
        offsets = None if t_off is None else t_off[i]
        nbytes[i] = _kept_bytes(ex.target, targets[i], offsets, lo, hi, tokenizer)
        rows.append((ids, first, len(ids)))
    if not rows:
        raise LensLLMInputError("no examples to tokenize", file=name or None)
    width = max(end for _, _, end in rows)
    n = len(rows)
    tokens = np.full((n, width), pad, np.int32)
    loss_mask = np.zeros((n, width), np.int32)
    attention = np.zeros((n, width), np.int32)
    for i, (ids, first, end) in enumerate(rows):
        tokens[i, :end] = ids
        attention[i, :end] = 1
        loss_mask[i, first:end] = 1
    return TokenData(tokens, loss_mask, attention, nbytes)


def python_doc_paragraphs(n: int) -> list[str]:
    """The first `n` (sorted, distinct) paragraphs of 80-240 characters of Python's own
    documentation (`pydoc_data.topics`, on every Python install): real English text for
    demos, notebooks, tests and benchmarks without a download. Whitespace is collapsed, so
    each paragraph is one line of a .txt data file. Cost: one pass over ~1 MB of text."""
    import pydoc_data.topics

    out: set[str] = set()
    for text in pydoc_data.topics.topics.values():
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if 80 < len(para) < 240:
                out.add(para)
    return sorted(out)[:n]
