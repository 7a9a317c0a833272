"""An exploration for issue 7's goals on the Python docs: how much of the keys'
attention KL does query-aware rounding (`fp4kv_jax.key_rounding`) remove, and where
must its query moments come from?

It scores the keys as `key_error_experiment.py` does (attention KL of each layer and KV
head, values exact, keys centered on their window's mean and stored Hadamard-rotated),
with each key rounded to its nearest code or rounded query-aware against the query
moments of:
- `same window`: the window's own queries (the most favourable source);
- `first 512`: the window's first 512 queries only (what a cache that calibrates on
  its first prompt would see);
- `calibrated`: `fp4kv_jax.ablate.calibration_moments` on the calibration text (by
  default Shakespeare, as `fp4kv ablate` calibrates rows scored on another corpus).

    python docs/ablation/key_rounding_experiment.py --corpus FILE --out DIR [--calibration FILE]

Writes results.json and results.md to DIR; about 10 minutes on 2 CPU cores for two
windows of 2,048 tokens.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from key_error_experiment import (
    attention_kl,
    captured,
    markdown,
    parse_model_and_windows,
    queries_and_keys,
    top_share,
    write_results,
)
from fp4kv_jax import ablate, key_rounding
from fp4kv_jax.formats import get_codec
from fp4kv_jax.rotation import hadamard_matrix

FIRST_QUERIES = 512
# (row, key format, moments source or None for nearest rounding)
TREATMENTS = (
    ("nvfp4_search, nearest", "nvfp4_search", None),
    ("nvfp4_search, rounded, same window", "nvfp4_search", "same"),
    (f"nvfp4_search, rounded, first {FIRST_QUERIES}", "nvfp4_search", "first"),
    ("nvfp4_search, rounded, calibrated", "nvfp4_search", "calibrated"),
    ("nvfp4_search_b4, nearest", "nvfp4_search_b4", None),
    ("nvfp4_search_b4, rounded, calibrated", "nvfp4_search_b4", "calibrated"),
)


def moments_of(queries: np.ndarray) -> np.ndarray:
    """float64 [D, D]: E[q q^T] of queries [..., D]."""
    flat = queries.reshape(-1, queries.shape[-1]).astype(np.float64)
    return flat.T @ flat / len(flat)


def stored_keys(key: np.ndarray, fmt: str, moments: np.ndarray | None) -> np.ndarray:
    """Centered keys [T, D] as attention reads them back after the rotation and `fmt`,
    rounded against `moments` [D, D] (model frame), or to the nearest code."""
    rotation = hadamard_matrix(key.shape[-1]).astype(np.float64)
    x = jnp.asarray((key @ rotation)[None, :, None], jnp.float32)
    codec = get_codec(fmt)
    global_scale = codec.global_scale_for(x)
    if moments is None:
        moments = np.eye(key.shape[-1])
    factor = key_rounding.rounding_factor(moments[None], rotated=True)
    data, scales = key_rounding.round_keys(x, fmt, global_scale, factor)
    return np.asarray(codec.decode(data, scales, global_scale), np.float64)[0, :, 0] @ rotation.T


def main() -> int:
    args, model, corpus_name, windows = parse_model_and_windows(
        __doc__.split("\n\n")[0], calibration=True
    )
    calibration_name, calibration_texts = ablate.load_corpus(args.calibration)
    calibrated = ablate.calibration_moments(model, calibration_texts)
    layers = captured(model, windows, queries_and_keys)
    num_layers, kv_heads = len(layers), layers[0][1].shape[2]
    group = layers[0][0].shape[2] // kv_heads
    rows = []
    for name, fmt, source in TREATMENTS:
        kl = np.zeros((num_layers, kv_heads))
        error, norm = 0.0, 0.0
        for layer, (q, k) in enumerate(layers):
            for w in range(len(windows)):
                centered = k[w] - k[w].mean(axis=0)
                for head in range(kv_heads):
                    q_head = q[w, :, head * group : (head + 1) * group]
                    moments = {
                        None: None,
                        "same": lambda: moments_of(q_head),
                        "first": lambda: moments_of(q_head[:FIRST_QUERIES]),
                        "calibrated": lambda: calibrated[layer, head],
                    }[source]
                    key = centered[:, head].astype(np.float64)
                    miss = stored_keys(key, fmt, moments if moments is None else moments()) - key
                    error, norm = error + np.sum(miss**2), norm + np.sum(key**2)
                    kl[layer, head] += float(attention_kl(
                        jnp.asarray(q_head.transpose(1, 0, 2)), jnp.asarray(key, jnp.float32),
                        jnp.asarray(miss, jnp.float32),
                    )) / len(windows)
        rows.append(dict(name=name, bits=get_codec(fmt).bits_per_element(k.shape[-1]),
                         key_error=float(np.sqrt(error / norm)), attention_kl_sum=float(kl.sum()),
                         top_share=top_share(kl), attention_kl=kl.tolist()))
        print(f"{name}: attention KL {kl.sum():.3f}", file=sys.stderr, flush=True)
    results = dict(
        config=dict(model="smollm2-135m", corpus=corpus_name, calibration=calibration_name,
                    context=args.context, windows=len(windows), jax=jax.__version__,
                    device=jax.devices()[0].device_kind),
        treatments=rows,
    )
    write_results(args.out, results, markdown(results, baseline="nearest rounding"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
