"""Loader sources (HF cache, pickle flag, GGUF) and bad input: one clear error, never partial."""

from __future__ import annotations

import copy
import json
import shutil

import gguf
import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from models_helpers import VOCAB, rel_err, save, tiny_torch_model, tokens, torch, torch_logits
from safetensors.numpy import load_file, save_file

from lensllm_jax import models
from lensllm_jax.models.gguf_file import unpermute_qk


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = tiny_torch_model("llama2_untied")
    return model, save(model, tmp_path_factory.mktemp("llama"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- bad input


def test_directory_without_config(tmp_path):
    with pytest.raises(models.ModelLoadError, match=rf"{tmp_path}.*no config\.json"):
        models.load(tmp_path)


def test_unsupported_model_type(llama_dir, tmp_path):
    d = _copy(llama_dir[1], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(models.ModelConfigError, match=r"config\.json: model_type 'bert'"):
        models.load(d)


def test_unsupported_rope_type(llama_dir, tmp_path):
    d = _copy(llama_dir[1], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.ModelConfigError, match="rope type 'yarn'"):
        models.load(d)


def _rewrite(d, edit):
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir[1], tmp_path / "m")
    _rewrite(d, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(
        models.ModelLoadError, match=r"'model\.layers\.2\.mlp\.up_proj\.weight' is missing"
    ):
        models.load(d)


def test_extra_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir[1], tmp_path / "m")
    _rewrite(
        d,
        lambda t: t.update(
            {"model.layers.3.self_attn.q_proj.weight": np.zeros((32, 32), np.float32)}
        ),
    )
    with pytest.raises(
        models.ModelLoadError,
        match=r"model\.safetensors: unexpected tensor 'model\.layers\.3\.self_attn\.q_proj\.",
    ):
        models.load(d)


def test_misshaped_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir[1], tmp_path / "m")
    _rewrite(d, lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
    with pytest.raises(models.ModelLoadError, match=r"'model\.norm\.weight' has shape \(31,\)"):
        models.load(d)


def test_truncated_file(llama_dir, tmp_path):
    d = _copy(llama_dir[1], tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(
        models.ModelLoadError, match=r"model\.safetensors: tensor '.*' lies past the end"
    ):
        models.load(d)


def test_corrupted_header(llama_dir, tmp_path):
    d = _copy(llama_dir[1], tmp_path / "m")
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[10:40] = b"\xff" * 30
    f.write_bytes(bytes(raw))
    with pytest.raises(models.ModelLoadError, match=r"model\.safetensors: unreadable safetensors"):
        models.load(d)


def test_nan_weights_rejected(llama_dir, tmp_path):
    d = _copy(llama_dir[1], tmp_path / "m")

    def poison(t):
        t["model.layers.1.self_attn.v_proj.weight"][3, 4] = np.nan

    _rewrite(d, poison)
    with pytest.raises(models.ModelLoadError, match=r"'model\.layers\.1\.self_attn\.v_proj.*NaN"):
        models.load(d)


def test_missing_shard(tmp_path):
    d = save(tiny_torch_model("gpt2"), tmp_path / "m", max_shard_size="20KB")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(models.ModelLoadError, match=rf"shard {shard.name} .* is missing"):
        models.load(d)


def test_pickle_needs_explicit_flag(llama_dir, tmp_path):
    model, _ = llama_dir
    d = tmp_path / "bin"  # transformers 5 no longer writes .bin: write it as 4.x did
    d.mkdir()
    shutil.copy(llama_dir[1] / "config.json", d / "config.json")
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(models.ModelLoadError, match=r"pytorch_model\.bin: only a pickle"):
        models.load(d)
    m = models.load(d, allow_pickle=True)
    x = tokens()
    assert rel_err(jax.jit(m.apply)(m.params, x), torch_logits(model, x)) < 1e-4


def test_not_found_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(models.ModelLoadError, match="no such file"):
        models.load(tmp_path / "nope")
    with pytest.raises(models.ModelLoadError, match="not in the Hugging Face cache"):
        models.load("someorg/not-there")


# ---------------------------------------------------------------- Hugging Face cache


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_repo_id_from_local_cache(llama_dir, tmp_path, monkeypatch, env):
    model, src = llama_dir
    hub = tmp_path / "hub"
    repo = hub / "models--tinyorg--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(env, str(hub if env == "HF_HUB_CACHE" else tmp_path))
    m = models.load("tinyorg/tiny-llama")
    assert m.source.endswith(commit)
    x = tokens()
    assert rel_err(jax.jit(m.apply)(m.params, x), torch_logits(model, x)) < 1e-4
    with pytest.raises(models.ModelLoadError, match="revision 'v2' has no snapshot"):
        models.load("tinyorg/tiny-llama", revision="v2")


# ---------------------------------------------------------------- GGUF


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.LlamaModel.permute (the forward direction)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_gguf(model, path, qtype: Q) -> dict[str, tuple[str, np.ndarray]]:
    """Write a llama GGUF the way llama.cpp's converter does; returns, by GGUF name, the HF name
    and the stored (quantised) bytes of every tensor."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    stored = {}
    for name, p in model.state_dict().items():
        a = p.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            a = _llama_cpp_permute(a, c.num_attention_heads)
        if name.endswith("k_proj.weight"):
            a = _llama_cpp_permute(a, c.num_key_value_heads)
        parts = name.split(".")
        if parts[1] == "layers":
            g = f"blk.{parts[2]}.{_GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
        else:
            g = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        if a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(g, a)
            stored[g] = (name, a)
        else:
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=qtype)
            stored[g] = (name, q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def reference_dequant(raw: np.ndarray, qtype: Q) -> np.ndarray:
    """ggml block formats written out from the spec (independent of gguf.quants.dequantize)."""
    if raw.dtype != np.uint8:  # F32 / F16 (norm vectors are always stored as F32)
        return raw.astype(np.float32)
    rows = raw.shape[0]
    size = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[qtype]
    b = raw.reshape(rows, -1, size)
    d = b[..., :2].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
    if qtype == Q.Q8_0:
        return (d * b[..., 2:].copy().view(np.int8).astype(np.float32)).reshape(rows, -1)
    off = 2 if qtype == Q.Q4_0 else 4
    qs = b[..., off:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)  # low nibbles first
    if qtype == Q.Q4_0:
        return (d * (q - 8)).reshape(rows, -1)
    m = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    return (d * q + m).reshape(rows, -1)


@pytest.fixture(scope="module")
def gguf_model():
    torch.manual_seed(0)
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_gguf_f32_matches_torch(gguf_model, tmp_path):
    write_gguf(gguf_model, tmp_path / "m.gguf", Q.F32)
    m = models.load(tmp_path / "m.gguf")
    assert (m.config.num_kv_heads, m.config.rope_theta, m.config.tie_word_embeddings) == (
        2,
        50000.0,
        False,
    )
    x = tokens()
    assert rel_err(jax.jit(m.apply)(m.params, x), torch_logits(gguf_model, x)) < 1e-4


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_gguf_dequantisation(gguf_model, tmp_path, qtype):
    stored = write_gguf(gguf_model, tmp_path / "m.gguf", qtype)
    m = models.load(tmp_path / "m.gguf")
    # Reference: the torch model holding the spec-dequantised (and un-permuted) weights.
    state = {}
    for hf_name, raw in stored.values():
        a = reference_dequant(raw, qtype)
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            a = unpermute_qk(a, 4 if "q_proj" in hf_name else 2)
        state[hf_name] = torch.tensor(a.reshape(gguf_model.state_dict()[hf_name].shape))
    ref = copy.deepcopy(gguf_model)
    ref.load_state_dict(state)
    np.testing.assert_allclose(
        np.asarray(m.params["layers"]["q"]["kernel"][1]).T,
        state["model.layers.1.self_attn.q_proj.weight"].numpy(),
        rtol=0,
        atol=1e-6,
    )
    x = tokens()
    ours = jax.jit(m.apply)(m.params, x)
    assert rel_err(ours, torch_logits(ref, x)) < 1e-4
    # Quantisation changed the weights, and only a little (real, not vacuous, comparison).
    err = rel_err(ours, torch_logits(gguf_model, x))
    lo, hi = {Q.F16: (0, 1e-3), Q.Q8_0: (1e-3, 0.1), Q.Q4_0: (1e-2, 1.0), Q.Q4_1: (1e-2, 1.0)}[
        qtype
    ]
    assert lo <= err < hi


def test_gguf_missing_tensor(gguf_model, tmp_path):
    model = copy.deepcopy(gguf_model)
    model.model.layers[1].mlp.down_proj = None  # state_dict then lacks the tensor
    write_gguf(model, tmp_path / "m.gguf", Q.F32)
    with pytest.raises(models.ModelLoadError, match=r"m\.gguf: tensor 'blk\.1\.ffn_down\.weight'"):
        models.load(tmp_path / "m.gguf")


def test_gguf_truncated(gguf_model, tmp_path):
    write_gguf(gguf_model, tmp_path / "m.gguf", Q.Q8_0)
    f = tmp_path / "m.gguf"
    f.write_bytes(f.read_bytes()[:-5000])
    with pytest.raises(models.ModelLoadError, match=r"m\.gguf"):
        models.load(f)


def test_gguf_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "b.gguf"), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(models.ModelConfigError, match=r"b\.gguf: GGUF architecture 'bert'"):
        models.load(tmp_path / "b.gguf")
