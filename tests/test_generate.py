"""generate(): greedy output equals the full-forward argmax chain, seeded sampling,
ragged prompts, early exit, no recompilation, and clear refusals."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fp4kv_jax import generate
from fp4kv_jax.generate import _decode_loop, _prefill
from fp4kv_jax.models import from_pretrained

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "qwen3"
PROMPTS = [[5, 6, 7, 8, 9], [10, 11]]


@pytest.fixture(scope="module")
def tiny():
    return from_pretrained(FIXTURE, dtype=jnp.float32)


def _argmax_chain(model, prompt, steps):
    forward = nnx.jit(lambda model, ids: model(ids)[0, -1])  # one compile a length, not one an op
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(np.argmax(np.asarray(forward(model, np.array([ids]))))))
    return ids[len(prompt) :]


def test_greedy_ragged_batch_equals_the_full_forward_argmax_chain(tiny):
    result = generate(tiny, PROMPTS, max_new_tokens=6, cache_dtype="float32", eos_token_ids=[])
    for prompt, tokens in zip(PROMPTS, result.tokens):
        assert tokens == _argmax_chain(tiny, prompt, 6)
    assert result.lengths == [6, 6] and result.texts is None
    assert result.prefill_seconds > 0 and result.decode_tokens_per_second > 0


def test_positions_kept_in_bf16_generate_as_a_bf16_cache_does(tiny):
    # A ragged batch: the kept ring of each sequence follows its own length.
    bf16 = generate(tiny, PROMPTS, max_new_tokens=6, cache_dtype="bf16", eos_token_ids=[])
    kept = generate(
        tiny, PROMPTS, max_new_tokens=6, cache_dtype="fp4_e2m1", eos_token_ids=[],
        cache_options=dict(keep_first=1, keep_recent=11),
    )
    assert kept.tokens == bf16.tokens


def test_end_token_stops_a_sequence_early(tiny):
    chain = _argmax_chain(tiny, PROMPTS[0], 6)
    result = generate(tiny, PROMPTS[:1], max_new_tokens=6, cache_dtype="float32", eos_token_ids=[chain[2]])
    assert result.tokens == [chain[:2]]


def test_same_seed_same_tokens_and_no_recompilation(tiny):
    kwargs = dict(max_new_tokens=5, cache_dtype="bf16", temperature=0.9, top_k=30, top_p=0.9)
    first = generate(tiny, PROMPTS, seed=7, **kwargs)
    compiled = (_prefill._cache_size(), _decode_loop._cache_size())
    again = generate(tiny, PROMPTS, seed=7, **kwargs)
    other_prompts = generate(tiny, [[1, 2, 3, 4, 5], [9, 9]], seed=7, **kwargs)
    assert first.tokens == again.tokens
    assert (_prefill._cache_size(), _decode_loop._cache_size()) == compiled
    assert other_prompts.tokens != first.tokens


def test_cache_dtype_changes_the_memory_used(tiny):
    from fp4kv_jax.memory import kv_cache_bytes

    max_len = len(PROMPTS[0]) + 2
    for dtype, planned in (("auto", "float32"), ("bf16", "bf16"), ("fp4_e2m1", "fp4_e2m1")):
        used = generate(tiny, PROMPTS, max_new_tokens=2, cache_dtype=dtype).cache_bytes
        assert used == kv_cache_bytes(tiny.config, planned, len(PROMPTS), max_len)
    assert kv_cache_bytes(tiny.config, "fp4_e2m1", 2, max_len) < 0.3 * kv_cache_bytes(tiny.config, "bf16", 2, max_len)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=4, max_len=6), "max_len: 6 positions cannot hold"),
        (dict(max_new_tokens=4, cache_dtype="int4"), "cache_dtype: unknown cache format 'int4'"),
        (dict(max_new_tokens=4, top_p=1.5), "top_p"),
        (dict(max_new_tokens=300), "max_position_embeddings"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny, PROMPTS, **kwargs)
    with pytest.raises(ValueError, match="strings need a model with a tokenizer"):
        generate(tiny, ["hello"], max_new_tokens=2)


def test_smollm2_greedy_generation_matches_the_argmax_chain_and_says_paris():
    model = from_pretrained("smollm2-135m", dtype=jnp.float32)
    prompt = "The capital of France is"
    result = generate(model, [prompt], max_new_tokens=4, cache_dtype="bf16", stop=["\n"])
    assert result.texts[0].startswith(" Paris")
    ids = model.tokenizer.encode(prompt).ids
    assert result.tokens[0] == _argmax_chain(model, ids, len(result.tokens[0]))
