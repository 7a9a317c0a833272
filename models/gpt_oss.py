"""GPT-OSS-like decoder in Flax NNX: alternating sliding/full attention with learned
sinks, q/k/v/o biases, YaRN RoPE, and a top-k mixture of clamped-SwiGLU experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fp4kv_jax.models.configs import ModelConfig
from fp4kv_jax.models.layers import Linear
from fp4kv_jax.models.transformer import CausalLM

SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


class MoE(nnx.Module):
    """Top-k routed experts.

    The router's top-k logits are softmaxed into the weights of the chosen experts.
    Each expert computes gate_up = x @ gate_up_proj + bias with gate and up
    interleaved along the last axis, then (clip(up, +-7) + 1) * g * sigmoid(1.702 g)
    with g = min(gate, 7), then @ down_proj + bias. Every expert runs on every token
    (dense), weighted by zero for those not chosen: simple, and exact.
    """

    def __init__(self, config: ModelConfig, dtype: jnp.dtype):
        experts, hidden, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.top_k = config.experts_per_token
        self.router = Linear(hidden, experts, bias=True, dtype=dtype)
        self.gate_up_proj = nnx.Param(jnp.zeros((experts, hidden, 2 * inter), dtype))
        self.gate_up_proj_bias = nnx.Param(jnp.zeros((experts, 2 * inter), dtype))
        self.down_proj = nnx.Param(jnp.zeros((experts, inter, hidden), dtype))
        self.down_proj_bias = nnx.Param(jnp.zeros((experts, hidden), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        logits = self.router(x).astype(jnp.float32)  # [B, T, E]
        top_values, top_index = jax.lax.top_k(logits, self.top_k)
        top_weights = jax.nn.softmax(top_values, axis=-1)
        experts = logits.shape[-1]
        weights = jnp.sum(jax.nn.one_hot(top_index, experts) * top_weights[..., None], axis=-2)
        gate_up = jnp.einsum("bth,ehi->btei", x, self.gate_up_proj[...], precision="highest")
        gate_up = gate_up + self.gate_up_proj_bias[...]
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
        gate = jnp.minimum(gate, SWIGLU_LIMIT)
        up = jnp.clip(up, -SWIGLU_LIMIT, SWIGLU_LIMIT)
        activated = (up + 1) * gate * jax.nn.sigmoid(gate * SWIGLU_ALPHA)
        out = jnp.einsum("btei,eih->bteh", activated, self.down_proj[...], precision="highest")
        out = out + self.down_proj_bias[...]
        return jnp.einsum("bteh,bte->bth", out, weights.astype(out.dtype), precision="highest")


class GptOssModel(CausalLM):
    """A GPT-OSS-like causal LM; see `CausalLM` for the call convention."""

    def __init__(self, config: ModelConfig, dtype: jnp.dtype = jnp.bfloat16):
        if config.architecture != "gpt_oss":
            raise ValueError(f"config.architecture: expected 'gpt_oss', got {config.architecture!r}.")
        if config.num_experts < 1 or not 1 <= config.experts_per_token <= config.num_experts:
            raise ValueError(
                f"config: num_experts={config.num_experts}, experts_per_token="
                f"{config.experts_per_token}; need 1 <= experts_per_token <= num_experts."
            )
        mlps = [MoE(config, dtype) for _ in range(config.num_layers)]
        super().__init__(config, dtype, mlps, sinks=True)
