"""`generate`: batched text generation over any cache dtype, compiled end to end.

Prefill is one jitted call over the right-padded, ragged batch of prompts; the whole
decode loop is one jitted `lax.while_loop` over decode steps with the cache donated,
which stops early once every sequence has produced an end token. Both are cached by
shape, so a second call with the same shapes compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fp4kv_jax import cache as kv_cache
from fp4kv_jax.formats import get_codec

_AUTO_CACHE_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "float32"}


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What `generate` made.

    Attributes:
      tokens: per sequence, the generated token ids (an end token not included).
      texts: per sequence, the decoded text cut at the first stop string, or None when
        the model has no tokenizer.
      lengths: per sequence, len(tokens).
      prefill_seconds: wall time of the prefill, compilation excluded when cached.
      time_to_first_token: seconds from the call's start until the first token's
        logits are ready (the prefill; the sample itself is the decode loop's first step).
      decode_tokens_per_second: generated tokens of the whole batch per second of the
        decode loop.
      cache_bytes: bytes of the KV cache the call allocated (data and scales).
    """

    tokens: list[list[int]]
    texts: list[str] | None
    lengths: list[int]
    prefill_seconds: float
    time_to_first_token: float
    decode_tokens_per_second: float
    cache_bytes: int


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None, top_p: float | None):
    """Next tokens int32 [B] from float32 logits [B, V]; greedy when temperature == 0."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays while the
        # mass before it is still short of top_p.
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(graphdef, state, input_ids, num_tokens, cache):
    model = nnx.merge(graphdef, state)
    logits, cache = model(input_ids, cache=cache, num_tokens=num_tokens)
    last = jnp.take_along_axis(logits, (num_tokens - 1)[:, None, None], axis=1)[:, 0]
    return last, cache


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "end_ids", "on_token",
    ),
    donate_argnames=("cache",),
)
def _decode_loop(
    graphdef, state, cache, logits, key, *, max_new_tokens, temperature, top_k, top_p, end_ids,
    on_token,
):
    model = nnx.merge(graphdef, state)
    batch = logits.shape[0]

    def keep_going(carry):
        _, _, _, step, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def step_once(carry):
        cache, logits, out, step, done, key = carry
        key, subkey = jax.random.split(key)
        token = sample(logits, subkey, temperature, top_k, top_p)
        token = jnp.where(done, -1, token)
        out = out.at[:, step].set(token)
        if on_token is not None:
            jax.debug.callback(on_token, token, ordered=True)
        done = done | jnp.isin(token, jnp.asarray(end_ids, jnp.int32))
        next_logits, cache = model(jnp.maximum(token, 0)[:, None], cache=cache)
        return cache, next_logits[:, 0], out, step + 1, done, key

    out = jnp.full((batch, max_new_tokens), -1, jnp.int32)
    init = (cache, logits, out, jnp.int32(0), jnp.zeros((batch,), bool), key)
    cache, _, out, steps, _, _ = jax.lax.while_loop(keep_going, step_once, init)
    return out, steps, cache


def _token_lists(model, prompts) -> list[list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts: expected a non-empty list of strings or of token-id lists.")
    if all(isinstance(p, str) for p in prompts):
        if model.tokenizer is None:
            raise ValueError("prompts: strings need a model with a tokenizer; pass token ids instead.")
        lists = [model.tokenizer.encode(p).ids for p in prompts]
    else:
        lists = [list(map(int, p)) for p in prompts]
    vocab = model.config.vocab_size
    for i, ids in enumerate(lists):
        if not ids:
            raise ValueError(f"prompts: prompt {i} is empty.")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompts: prompt {i} has token ids outside [0, {vocab}).")
    return lists


def generate(
    model,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    cache_dtype: str = "bf16",
    cache_options: Mapping[str, Any] | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_token_ids: Sequence[int] | None = None,
    stop: Sequence[str] = (),
    max_len: int | None = None,
    on_token=None,
) -> GenerationResult:
    """Generates up to `max_new_tokens` tokens for each prompt.

    Args:
      model: a model from `fp4kv_jax.models`.
      prompts: strings (the model's tokenizer encodes them) or token-id lists; lengths
        may differ.
      max_new_tokens: tokens to generate per sequence, at most.
      cache_dtype: any cache format name, or "auto" for the model's own dtype.
      cache_options: more keyword arguments of `fp4kv_jax.cache.init_cache`, such as
        rotate_keys=True.
      temperature: 0 for greedy decoding; otherwise the softmax temperature.
      top_k, top_p: sampling filters (None for off). The same seed gives the same tokens.
      eos_token_ids: tokens that end a sequence; default the config's `eos_token_id`.
      stop: strings at which each decoded text is cut (after generation).
      max_len: the cache's positions per sequence; default longest prompt +
        max_new_tokens. Too small a value is refused before any work.
      on_token: a host function called after each decode step with the int32 [B]
        tokens just sampled (-1 for finished sequences), for streaming and progress
        bars. It must be hashable (a plain function is); each distinct one compiles
        the decode loop once.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}.")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}.")
    if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"top_k: must lie in [1, {model.config.vocab_size}], got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: must lie in (0, 1], got {top_p}.")
    if cache_dtype == "auto":
        cache_dtype = _AUTO_CACHE_DTYPES[jnp.dtype(model.dtype).name]
    get_codec(cache_dtype, arg="cache_dtype")
    lists = _token_lists(model, prompts)
    longest = max(map(len, lists))
    needed = longest + max_new_tokens
    if max_len is None:
        max_len = needed
    elif max_len < needed:
        raise ValueError(
            f"max_len: {max_len} positions cannot hold the longest prompt ({longest} tokens) "
            f"plus max_new_tokens={max_new_tokens}; need {needed}."
        )
    if max_len > model.config.max_position_embeddings:
        raise ValueError(
            f"max_len: {max_len} exceeds the model's max_position_embeddings "
            f"({model.config.max_position_embeddings}); shorten the prompts or max_new_tokens."
        )
    if eos_token_ids is None:
        eos_token_ids = model.config.eos_token_ids
    end_ids = tuple(int(i) for i in eos_token_ids) or (-2,)  # -2: no token ends a sequence

    start = time.perf_counter()
    input_ids = np.zeros((len(lists), longest), np.int32)
    for row, ids in enumerate(lists):
        input_ids[row, : len(ids)] = ids
    num_tokens = jnp.asarray([len(ids) for ids in lists], jnp.int32)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(len(lists), max_len, cache_dtype, **(cache_options or {}))
    logits, cache = jax.block_until_ready(_prefill(graphdef, state, input_ids, num_tokens, cache))
    prefill_seconds = time.perf_counter() - start

    decode_start = time.perf_counter()
    out, steps, cache = jax.block_until_ready(
        _decode_loop(
            graphdef, state, cache, logits, jax.random.key(seed),
            max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
            top_p=top_p, end_ids=end_ids, on_token=on_token,
        )
    )
    decode_seconds = time.perf_counter() - decode_start
    kv_cache.check_cache(cache)

    tokens = []
    for row in np.asarray(out):
        row = [int(t) for t in row if t >= 0]
        cut = next((i for i, t in enumerate(row) if t in end_ids), len(row))
        tokens.append(row[:cut])
    texts = None
    if model.tokenizer is not None:
        texts = [_cut_at_stop(model.tokenizer.decode(ids), stop) for ids in tokens]
    generated = sum(len(t) for t in tokens)
    return GenerationResult(
        tokens=tokens,
        texts=texts,
        lengths=[len(t) for t in tokens],
        prefill_seconds=prefill_seconds,
        time_to_first_token=prefill_seconds,
        decode_tokens_per_second=generated / decode_seconds if decode_seconds > 0 else float("nan"),
        cache_bytes=cache.nbytes,
    )


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.index(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text
