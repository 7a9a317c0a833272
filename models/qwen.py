"""Qwen-like decoder (Qwen2, Qwen3, Llama/SmolLM2) in Flax NNX, one implementation.

Flags from the config select the variant: q/k/v biases (`attention_bias`, Qwen2),
per-head q/k RMSNorm (`qk_norm`, Qwen3), tied embeddings (Llama/SmolLM2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fp4kv_jax.models.configs import ModelConfig
from fp4kv_jax.models.layers import Linear
from fp4kv_jax.models.transformer import CausalLM

QWEN_ARCHITECTURES = ("llama", "qwen2", "qwen3")


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, dtype: jnp.dtype):
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False, dtype=dtype)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False, dtype=dtype)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False, dtype=dtype)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class QwenModel(CausalLM):
    """A Qwen-like causal LM; see `CausalLM` for the call convention."""

    def __init__(self, config: ModelConfig, dtype: jnp.dtype = jnp.bfloat16):
        if config.architecture not in QWEN_ARCHITECTURES:
            raise ValueError(
                f"config.architecture: {config.architecture!r} is not Qwen-like; valid: "
                f"{', '.join(QWEN_ARCHITECTURES)}."
            )
        mlps = [MLP(config, dtype) for _ in range(config.num_layers)]
        super().__init__(config, dtype, mlps, sinks=False)
