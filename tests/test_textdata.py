"""textdata: strict readers, seeded splits, nested subsets, and tokenization checked by hand."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from lensllm_jax.data.text import (
    Example,
    TokenData,
    nested_subset,
    read_examples,
    split_examples,
    tokenize,
)
from lensllm_jax.errors import LensLLMInputError

CHARS = "abcdefghijklmnopqrstuvwxyz .,é"


def char_tokenizer(*, adds_bos: bool = False, special: bool = True):
    """A character-level fast tokenizer: ids 0..3 = <s>, </s>, <pad>, <unk>, then CHARS in
    order (so "a" = 4 and "é" = 4 + 29 = 33). `adds_bos`: puts <s> first by default, like
    Llama; `special=False`: no bos/eos/pad at all."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    if adds_bos:
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 0)]
        )
    kw = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>") if special else {}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **kw)


def ids(text: str) -> list[int]:
    return [4 + CHARS.index(c) for c in text]


# --------------------------------------------------------------------------------------------
# read_examples


def test_read_jsonl_all_schemes_bom_crlf(tmp_path):
    lines = [
        json.dumps({"text": "hello world", "id": 7}),
        "",
        json.dumps({"prompt": "Q: 2+2?", "completion": " 4"}),
        json.dumps({"input": "x", "output": "y\u2028z"}, ensure_ascii=False),
        "   ",
    ]
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8"))
    assert read_examples(p) == [
        Example("", "hello world"),
        Example("Q: 2+2?", " 4"),
        Example("x", "y\u2028z"),
    ]


def test_read_txt_one_example_per_line(tmp_path):
    p = tmp_path / "d.TXT"
    p.write_bytes(b"first line\r\n\r\n  second  \n")
    assert read_examples(p) == [Example("", "first line"), Example("", "  second  ")]


@pytest.mark.parametrize(
    ("name", "content", "expect"),
    [
        ("d.jsonl", '{"text": "ok"}\n{"text": "bad"\n', r"d\.jsonl: line 2: bad JSON"),
        ("d.jsonl", '{"text": "ok"}\n\n{"prompt": "p"}\n', r"line 3: has 'prompt' but no 'comp"),
        ("d.jsonl", '{"txt": "a"}\n', r"line 1: no 'text', 'prompt'/'completion'.*'txt'"),
        ("d.jsonl", '{"text": 3}\n', r"line 1: 'text' is a JSON int, not a string"),
        ("d.jsonl", '["a"]\n', r"line 1: a JSON list, not an object"),
        ("d.jsonl", '{"text": "a", "prompt": "b", "completion": "c"}', r"line 1: ambiguous"),
        ("d.jsonl", '{"input": "q", "output": "  "}', r"line 1: 'output' is empty"),
        ("d.jsonl", "\n \r\n", r"d\.jsonl: empty file: no examples"),
        ("d.txt", "", r"d\.txt: empty file"),
        ("d.csv", "text\nx\n", r"d\.csv: unknown data file type '\.csv'; use \.jsonl"),
    ],
)
def test_read_errors_are_one_line_with_file_and_line(tmp_path, name, content, expect):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(LensLLMInputError, match=expect) as err:
        read_examples(p)
    msg = str(err.value)
    assert "\n" not in msg and str(p) in msg
    assert "; " in msg  # says what to do


def test_read_missing_and_non_utf8(tmp_path):
    with pytest.raises(LensLLMInputError, match=r"nope\.jsonl: file not found"):
        read_examples(tmp_path / "nope.jsonl")
    p = tmp_path / "latin.txt"
    p.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(LensLLMInputError, match=r"not UTF-8 text \(byte 3\); save the file"):
        read_examples(p)


# --------------------------------------------------------------------------------------------
# split_examples / nested_subset


def test_split_is_disjoint_complete_sorted_and_seeded():
    s = split_examples(50, num_test=10, num_probe=5, seed=3)
    assert (len(s.pool), len(s.test), len(s.probe)) == (35, 10, 5)
    allidx = np.concatenate(s)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(50))
    for a in s:
        assert np.all(np.diff(a) > 0)
    again = split_examples(50, num_test=10, num_probe=5, seed=3)
    for a, b in zip(s, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = split_examples(50, num_test=10, num_probe=5, seed=4)
    assert not np.array_equal(s.test, other.test)
    # the test set is the first num_test entries of the seeded permutation
    perm = np.random.default_rng(3).permutation(50)
    np.testing.assert_array_equal(s.test, np.sort(perm[:10]))


def test_split_too_few_examples():
    with pytest.raises(LensLLMInputError, match=r"10 examples are too few for 8 test \+ 2 probe"):
        split_examples(10, num_test=8, num_probe=2, seed=0)
    with pytest.raises(LensLLMInputError, match="num_test >= 1"):
        split_examples(10, num_test=0, num_probe=2, seed=0)


def test_nested_subsets_nest_and_are_seeded():
    pool = np.arange(100, 400, 3)  # 100 arbitrary example indices
    subs = [nested_subset(pool, k, seed=7) for k in (5, 20, 60, 100)]
    for small, big in itertools.pairwise(subs):
        np.testing.assert_array_equal(big[: len(small)], small)
        assert set(small) <= set(big)
    assert len(set(subs[-1])) == 100 and set(subs[-1]) == set(pool)
    np.testing.assert_array_equal(nested_subset(pool, 20, seed=7), subs[1])
    assert not np.array_equal(nested_subset(pool, 20, seed=8), subs[1])
    with pytest.raises(LensLLMInputError, match=r"subset size 101 is not an integer in 1\.\.100"):
        nested_subset(pool, 101, seed=0)


# --------------------------------------------------------------------------------------------
# tokenize


def test_tokenize_prompt_target_eos_padding_and_bytes():
    tok = char_tokenizer(adds_bos=True)
    d = tokenize([Example("ab", "cé"), Example("", "z")], tok, max_length=16)
    assert isinstance(d, TokenData)
    np.testing.assert_array_equal(d.tokens[0], [0, *ids("abcé"), 1])
    np.testing.assert_array_equal(d.loss_mask[0], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(d.attention_mask[0], [1] * 6)
    # the short example: BOS, target, EOS, then pad id 2; only z and EOS are scored
    np.testing.assert_array_equal(d.tokens[1], [0, *ids("z"), 1, 2, 2, 2])
    np.testing.assert_array_equal(d.loss_mask[1], [0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(d.attention_mask[1], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(d.target_bytes, [3, 1])  # "cé" = 1 + 2 UTF-8 bytes
    assert d.tokens.dtype == np.int32 and d.target_bytes.dtype == np.int64


def test_tokenize_without_default_bos_uses_start_token_only_for_empty_prompts():
    tok = char_tokenizer(adds_bos=False)
    d = tokenize([Example("ab", "c"), Example("", "cd")], tok)
    np.testing.assert_array_equal(d.tokens[0], [*ids("abc"), 1])
    np.testing.assert_array_equal(d.loss_mask[0], [0, 0, 1, 1])
    np.testing.assert_array_equal(d.tokens[1], [0, *ids("cd"), 1])
    np.testing.assert_array_equal(d.loss_mask[1], [0, 1, 1, 1])
    np.testing.assert_array_equal(d.target_bytes, [1, 2])


def test_tokenize_cuts_the_prompt_first_then_the_target_and_counts_kept_bytes():
    tok = char_tokenizer(adds_bos=True)
    ex = [Example("ab", "céd")]  # <s> a b | c é d EOS
    full = tokenize(ex, tok, max_length=7)
    np.testing.assert_array_equal(full.tokens[0], [0, *ids("abcéd"), 1])
    assert full.target_bytes[0] == 4 and full.loss_mask[0].sum() == 4  # c é d EOS
    d6 = tokenize(ex, tok, max_length=6)  # the prompt's beginning goes first
    np.testing.assert_array_equal(d6.tokens[0], [0, *ids("bcéd"), 1])
    np.testing.assert_array_equal(d6.loss_mask[0], [0, 0, 1, 1, 1, 1])
    d5 = tokenize(ex, tok, max_length=5)  # no prompt left, the whole target still scored
    np.testing.assert_array_equal(d5.tokens[0], [0, *ids("céd"), 1])
    assert d5.target_bytes[0] == 4 and d5.loss_mask[0].sum() == 4
    d3 = tokenize(ex, tok, max_length=3)  # a target longer than the room loses its end
    np.testing.assert_array_equal(d3.tokens[0], [0, *ids("cé")])
    assert d3.target_bytes[0] == 3 and d3.loss_mask[0].sum() == 2
    plain = char_tokenizer(special=False)  # no start token: one prompt token stays as context
    d = tokenize([Example("ab", "cd")], plain, max_length=3)
    np.testing.assert_array_equal(d.tokens[0], ids("bcd"))
    np.testing.assert_array_equal(d.loss_mask[0], [0, 1, 1])
    with pytest.raises(LensLLMInputError) as err:
        tokenize([Example("", "xy"), Example("", "x")], plain, max_length=3, name="tiny")
    msg = str(err.value)
    assert msg.startswith("tiny: example 1: no target token is left") and "max_length=3" in msg
    assert "raise max_length" in msg and "\n" not in msg


def test_tokenize_without_special_tokens():
    """No bos/eos/pad: pad id 0, and with an empty prompt the first target token is context
    (position 0) so neither it nor its bytes count."""
    tok = char_tokenizer(special=False)
    d = tokenize([Example("", "éab")], tok, max_length=2)
    np.testing.assert_array_equal(d.tokens, [ids("éa")])
    np.testing.assert_array_equal(d.loss_mask, [[0, 1]])
    assert d.target_bytes[0] == 1  # "a" only: "é" is context, "b" is cut
    with pytest.raises(LensLLMInputError, match="example 1: no target token"):
        tokenize([Example("", "éab"), Example("", "c")], tok, max_length=8)
    d = tokenize([Example("", "éab"), Example("", "cd")], tok, max_length=8)
    np.testing.assert_array_equal(d.tokens, [ids("éab"), [*ids("cd"), 0]])
    np.testing.assert_array_equal(d.loss_mask, [[0, 1, 1], [0, 1, 0]])
    np.testing.assert_array_equal(d.target_bytes, [2, 1])  # "ab", "d": é / c are context


class _SlowView:
    """A tokenizer without offsets (is_fast False): exercises the decode-based byte count."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *a, **kw):
        kw.pop("return_offsets_mapping", None)
        return self._tok(*a, **kw)


def test_tokenize_byte_count_without_offsets_matches_offsets():
    tok = char_tokenizer(adds_bos=False)
    ex = [Example("a", "éxyé"), Example("", "ééé"), Example("b", "z")]
    for n in (3, 4, 5, 8):
        fast = tokenize(ex, tok, max_length=n)
        slow = tokenize(ex, _SlowView(tok), max_length=n)
        np.testing.assert_array_equal(fast.tokens, slow.tokens)
        np.testing.assert_array_equal(fast.target_bytes, slow.target_bytes)
    np.testing.assert_array_equal(tokenize(ex, tok, max_length=3).target_bytes, [3, 4, 1])


def test_take_and_batch():
    tok = char_tokenizer(adds_bos=True)
    d = tokenize([Example("a", "b"), Example("", "cc"), Example("d", "e")], tok)
    sub = d.take([2, 0])
    np.testing.assert_array_equal(sub.tokens, d.tokens[[2, 0]])
    np.testing.assert_array_equal(sub.target_bytes, [1, 1])
    assert sub.num_examples == 2 and d.num_target_tokens == 2 + 3 + 2
    b = d.batch([1])
    assert set(b) == {"tokens", "loss_mask", "attention_mask"}
    np.testing.assert_array_equal(b["loss_mask"], d.loss_mask[1:2])


@pytest.mark.slow
def test_tokenize_with_the_smollm2_tokenizer(monkeypatch, smollm2_gguf):
    """A real byte-level BPE: untruncated bytes are the whole target; truncated bytes equal the
    bytes of the decoded kept target tokens (independent of the offsets used inside)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    p = smollm2_gguf
    tok = transformers.AutoTokenizer.from_pretrained(
        str(p.parent), gguf_file=p.name, local_files_only=True
    )
    ex = [
        Example("Translate to French: ", "The cat sleeps on the warm windowsill."),
        Example("", "Zürich ist schön, naïve café."),
    ]
    full = tokenize(ex, tok, max_length=256)
    assert list(full.target_bytes) == [len(e.target.encode()) for e in ex]
    assert tok.eos_token_id is not None
    for row in range(2):
        last = full.attention_mask[row].sum() - 1
        assert full.tokens[row, last] == tok.eos_token_id and full.loss_mask[row, last] == 1
    cut = tokenize(ex, tok, max_length=10)
    for row in range(2):
        kept = cut.tokens[row][cut.loss_mask[row] == 1]
        assert cut.target_bytes[row] == len(tok.decode(kept.tolist()).encode())
        assert 0 < cut.target_bytes[row] < full.target_bytes[row]


def test_python_doc_paragraphs_are_distinct_sorted_one_line_paragraphs_of_pydoc():
    import pydoc_data.topics

    from lensllm_jax.data.text import python_doc_paragraphs

    paras = python_doc_paragraphs(50)
    assert len(paras) == 50 and paras == sorted(set(paras))
    topics = pydoc_data.topics.topics.values()
    whole = {" ".join(p.split()) for t in topics for p in t.split("\n\n")}
    for p in paras:
        assert 80 < len(p) < 240 and "\n" not in p and p in whole
    assert python_doc_paragraphs(10) == paras[:10]  # nested: a prefix of the sorted list
