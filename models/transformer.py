"""The decoder shared by the models: attention over a KV cache, blocks, the LM wrapper.

Attention without a cache is plain causal attention; with a cache, the chunk's K/V
are quantized into the cache first and attention reads them back as stored, through
the kernels' ops (decode for one token, prefill otherwise), so prefill and decode see
the same values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fp4kv_jax import cache as kv_cache
from fp4kv_jax.kernels.decode_attention import decode_attention
from fp4kv_jax.kernels.masked_softmax import masked_softmax
from fp4kv_jax.kernels.prefill_attention import prefill_attention
from fp4kv_jax.models.configs import ModelConfig
from fp4kv_jax.models.layers import Linear, RMSNorm, apply_rope, rope_inverse_frequencies


def causal_attention(q, k, v, *, window=None, sinks=None):
    """Full causal attention without a cache. q [B, T, Hq, D]; k, v [B, T, Hkv, D]."""
    batch, chunk, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    qg = q.astype(jnp.float32).reshape(batch, chunk, kv_heads, group, dim)
    scores = jnp.einsum("bthgd,bshd->bhgts", qg, k.astype(jnp.float32), precision="highest")
    scores = scores / jnp.sqrt(jnp.float32(dim))
    pos = jnp.arange(chunk)
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    sink = None if sinks is None else sinks.astype(jnp.float32).reshape(1, kv_heads, group, 1, 1)
    probs = masked_softmax(scores, mask, sink)
    out = jnp.einsum("bhgts,bshd->bthgd", probs, v.astype(jnp.float32), precision="highest")
    return out.reshape(batch, chunk, heads, dim).astype(q.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; optional q/k/v biases, q/k RMSNorm, sinks."""

    def __init__(self, config: ModelConfig, dtype: jnp.dtype, *, sinks: bool = False):
        c = config
        self.config = c
        bias = c.attention_bias
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, bias=bias, dtype=dtype)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias, dtype=dtype)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias, dtype=dtype)
        # Qwen2 biases q/k/v only; GPT-OSS biases o_proj too.
        o_bias = bias and c.architecture == "gpt_oss"
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=o_bias, dtype=dtype)
        self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=dtype) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=dtype) if c.qk_norm else None
        # GPT-OSS: one learned logit per query head joins the softmax denominator.
        self.sinks = nnx.Param(jnp.zeros((c.num_heads,), jnp.float32)) if sinks else None

    def project(self, x, positions, rope):
        """x [B, T, hidden] -> roped q [B, T, Hq, D], k, v [B, T, Hkv, D]."""
        c = self.config
        batch, chunk, _ = x.shape
        q = self.q_proj(x).reshape(batch, chunk, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(batch, chunk, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(batch, chunk, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq, scale = rope
        return apply_rope(q, positions, inv_freq, scale), apply_rope(k, positions, inv_freq, scale), v

    def __call__(self, x, positions, rope, cache, layer, num_tokens=None):
        q, k, v = self.project(x, positions, rope)
        sinks = None if self.sinks is None else self.sinks[...]
        if cache is None:
            out = causal_attention(q, k, v, window=self.config.layer_window(layer), sinks=sinks)
        else:
            before = cache.layers[layer]
            cache = kv_cache.write_layer(cache, layer, k, v, num_tokens)
            stored = cache.layers[layer]
            if q.shape[1] == 1:  # decode reads the layer's kept copies as written
                out = decode_attention(q[:, 0], stored, cache.lengths + 1, sinks=sinks)[:, None]
            else:
                full_k, full_v = (
                    kv_cache.kept_values(before, cache.lengths, *kv_cache.to_stored_frame(stored, k, v))
                    if stored.keeps_positions
                    else (None, None)
                )
                out = prefill_attention(q, stored, cache.lengths, sinks=sinks, full_k=full_k, full_v=full_v)
        batch, chunk = x.shape[:2]
        return self.o_proj(out.reshape(batch, chunk, -1)), cache


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, dtype: jnp.dtype, mlp: nnx.Module, *, sinks: bool):
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(config, dtype, sinks=sinks)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.mlp = mlp

    def __call__(self, x, positions, rope, cache, layer, num_tokens=None):
        attended, cache = self.self_attn(
            self.input_layernorm(x), positions, rope, cache, layer, num_tokens
        )
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class CausalLM(nnx.Module):
    """Embedding, decoder layers, final norm and LM head.

    `model(input_ids)` returns float32 logits [B, T, vocab]; `model(input_ids, cache=c)`
    appends the T tokens of each sequence at its current length and returns
    (logits, new cache). With `num_tokens` (int32 [B]) only each sequence's leading
    tokens are real (a ragged prefill, right-padded): only those are written and
    counted, and logits past them are meaningless.
    """

    def __init__(self, config: ModelConfig, dtype: jnp.dtype, mlps: list[nnx.Module], *, sinks: bool):
        rope_inverse_frequencies(config)  # refuses an unsupported rope type up front
        self.config = config
        self.dtype = dtype
        self.tokenizer = None
        self.embed_tokens = nnx.Param(jnp.zeros((config.vocab_size, config.hidden_size), dtype))
        self.layers = nnx.List([DecoderLayer(config, dtype, mlp, sinks=sinks) for mlp in mlps])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        )

    def init_cache(self, batch_size: int, max_len: int, cache_dtype="bf16", **kwargs):
        """An empty KV cache for this model; see `fp4kv_jax.cache.init_cache`."""
        return kv_cache.init_cache(self.config, batch_size, max_len, cache_dtype, **kwargs)

    def __call__(self, input_ids: jax.Array, cache: kv_cache.KVCache | None = None, num_tokens=None):
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids: expected int [batch, tokens], got {input_ids.dtype} {input_ids.shape}.")
        batch, chunk = input_ids.shape
        if cache is None:
            positions = jnp.broadcast_to(jnp.arange(chunk), (batch, chunk))
        else:
            if cache.batch_size != batch:
                raise ValueError(f"cache: holds {cache.batch_size} sequences, input_ids has {batch}.")
            positions = cache.lengths[:, None] + jnp.arange(chunk)[None, :]
        rope = rope_inverse_frequencies(self.config)
        x = self.embed_tokens[...][input_ids]
        for layer, block in enumerate(self.layers):
            x, cache = block(x, positions, rope, cache, layer, num_tokens)
        x = self.norm(x)
        head = self.embed_tokens[...].T if self.lm_head is None else self.lm_head.kernel[...]
        logits = jnp.einsum("bth,hv->btv", x, head, precision="highest").astype(jnp.float32)
        if cache is None:
            return logits
        return logits, kv_cache.advance(cache, chunk if num_tokens is None else num_tokens)


@nnx.jit
def forward_with_cache(model: CausalLM, input_ids, cache: kv_cache.KVCache):
    """`model(input_ids, cache=cache)` compiled once a chunk shape: for stepping a model
    through its cache outside `generate` (notebooks, tests), where eager calls would
    compile op by op. Returns (logits, new cache)."""
    return model(input_ids, cache=cache)
