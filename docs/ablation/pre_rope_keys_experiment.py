"""An exploration for issue 7's 0.5% goal on the Python docs: would storing the keys
before RoPE (KVQuant's pre-RoPE keys) leave less FP4 error in attention than storing
them after it, as the library does?

After RoPE a channel pair's mean key turns with the position, so `+center_keys`
(the window's mean key, subtracted after RoPE) removes only the slowly turning pairs'
mean. Before RoPE the mean is one vector, which centering removes whole; a kernel would
then add it back and apply RoPE to each decoded key. Each treatment stores the keys in
`nvfp4_search` (4.5 bits), and is scored as `key_error_experiment.py`
scores its treatments: the attention KL per layer and KV head with exact values, the
model's own queries and keys over two windows of the corpus.

Treatments (Hadamard-rotated unless per channel):
- `after RoPE, centered`: the library's `+center_keys+hadamard` (key_error_experiment's
  first row);
- `before RoPE, centered`: the pre-RoPE keys minus their window mean, rotated, stored;
  read back, the mean added and RoPE applied;
- `before RoPE, not centered`: the same without the mean;
- `after RoPE, centered, per channel` and `before RoPE, centered, per channel`: not
  rotated, with a block scale per channel over 16 positions (KIVI's per-channel keys;
  KVQuant's finding is that they suit keys before RoPE, whose outlier channels stay
  put, where RoPE turns them from position to position).

    python docs/ablation/pre_rope_keys_experiment.py --corpus FILE --out DIR

Writes results.json and results.md to DIR; about 8 minutes on 2 CPU cores for two
windows of 2,048 tokens.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from fp4kv_jax.formats import dequantize, quantize
from fp4kv_jax.models.layers import apply_rope

from key_error_experiment import (
    attention_kl, captured, markdown, parse_model_and_windows, stored_keys, top_share, write_results,
)

FORMAT = "nvfp4_search"
TREATMENTS = (
    "after RoPE, centered", "before RoPE, centered", "before RoPE, not centered",
    "after RoPE, centered, per channel", "before RoPE, centered, per channel",
)


def queries_and_keys_both_sides_of_rope(q, k, positions, rope) -> tuple[np.ndarray, ...]:
    """`captured`'s record of q [T, Hq, D] and k [T, Hkv, D] after RoPE, k before it,
    and cos and sin [T, D/2] of the positions' angles, float32 and float64."""
    inv_freq, scale = rope
    if scale != 1.0:
        raise ValueError(f"rope: this exploration needs a RoPE scale of 1, got {scale}.")
    before = apply_rope(k, -positions, inv_freq, scale)  # RoPE turns each pair: -p undoes p
    angles = np.asarray(positions[0], np.float64)[:, None] * np.asarray(inv_freq, np.float64)
    return (np.asarray(q[0], np.float32), np.asarray(k[0], np.float32), np.asarray(before[0], np.float32),
            np.cos(angles), np.sin(angles))


def turned(k: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """HF `rotate_half` RoPE of k [T, D] at the angles whose cos and sin are [T, D/2]."""
    first, second = np.split(k, 2, axis=-1)
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def stored_per_channel(k: np.ndarray) -> np.ndarray:
    """k [T, D] as read back from FORMAT with its blocks along the positions of each
    channel (T a multiple of the block size)."""
    return np.asarray(dequantize(quantize(jnp.asarray(k.T, jnp.float32), FORMAT)), np.float64).T


def read_back(treatment: str, after: np.ndarray, before: np.ndarray, cos, sin) -> np.ndarray:
    """float64 [T, D]: the post-RoPE keys attention reads under `treatment`, for one
    KV head's keys after and before RoPE, [T, D]."""
    store = stored_per_channel if treatment.endswith("per channel") else (
        lambda k: stored_keys(k, np.eye(k.shape[-1]), FORMAT))
    if treatment.startswith("after RoPE"):
        mean = after.mean(axis=0)
        return store(after - mean) + mean
    mean = np.zeros(before.shape[-1]) if treatment.endswith("not centered") else before.mean(axis=0)
    return turned(store(before - mean) + mean, cos, sin)


def score(layers, treatment: str) -> tuple[np.ndarray, float]:
    """(attention KL float64 [layers, Hkv], the post-RoPE keys' relative error)."""
    kl = np.zeros((len(layers), layers[0][1].shape[2]))
    error, norm = 0.0, 0.0
    for layer, (q, k_after, k_before, cos, sin) in enumerate(layers):
        windows, _, num_heads, _ = q.shape
        kv_heads = k_after.shape[2]
        group = num_heads // kv_heads
        for w in range(windows):
            for head in range(kv_heads):
                after = k_after[w, :, head].astype(np.float64)
                miss = read_back(treatment, after, k_before[w, :, head].astype(np.float64), cos[w], sin[w]) - after
                centered = after - after.mean(axis=0)  # the error's size against the centered keys, as before
                error, norm = error + np.sum(miss**2), norm + np.sum(centered**2)
                q_head = q[w, :, head * group : (head + 1) * group]
                kl[layer, head] += float(attention_kl(
                    jnp.asarray(q_head.transpose(1, 0, 2)), jnp.asarray(after, jnp.float32),
                    jnp.asarray(miss, jnp.float32),
                )) / windows
    return kl, float(np.sqrt(error / norm))


def main() -> int:
    args, model, corpus_name, windows = parse_model_and_windows(__doc__.split("\n\n")[0])
    layers = captured(model, windows, queries_and_keys_both_sides_of_rope)
    rows = []
    for treatment in TREATMENTS:
        kl, key_error = score(layers, treatment)
        rows.append(dict(name=treatment, key_error=key_error, attention_kl_sum=float(kl.sum()),
                         top_share=top_share(kl), attention_kl=kl.tolist()))
        print(f"{treatment}: attention KL {kl.sum():.3f}, K err {key_error:.4f}", file=sys.stderr, flush=True)
    results = dict(
        config=dict(model="smollm2-135m", corpus=corpus_name, context=args.context, windows=len(windows),
                    key_format=FORMAT, jax=jax.__version__, device=jax.devices()[0].device_kind),
        treatments=rows,
    )
    write_results(args.out, results, markdown(results, keys=f"keys ({FORMAT})", baseline="after RoPE"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
