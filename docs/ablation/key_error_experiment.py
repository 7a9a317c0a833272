"""An exploration for issue 7's goals on the Python docs: where does the keys' FP4 error
do its damage, and would another treatment of the keys at the same bits do less?

It scores each treatment of the keys by its attention KL: for every layer and KV head,
the mean over a window's queries of KL(softmax of exact scores || softmax of the scores
against the stored keys), causal, summed over the layer's query heads and averaged over
the windows. Queries and keys are the model's own (bf16 cache, float32 parameters),
after RoPE, and the keys are centered on their window's mean, as `+center_keys` stores
them in the one-pass scoring. The values stay exact: this isolates the keys, where
almost all of FP4's damage is (docs/ablation/README.md, "Keys against values").

Treatments, each in the stored frame of `+center_keys+hadamard`:
- a key format: `nvfp4_search` (4.5 bits), `nvfp4_search_b8` (5), `nvfp4_search_b4`
  (6), `mxfp4` and `fp8_e4m3`;
- `smooth=A`: before the rotation each RoPE channel pair of the keys is multiplied by
  (E[q^2] / E[k^2]) ** (A / 4) of that pair, the queries divided by it (SmoothQuant's
  migration; exact in attention, and it commutes with RoPE, which turns each pair
  within itself), stored in `nvfp4_search`;
- `balanced`: the keys multiplied by the symmetric T with T^2 the matrix geometric mean
  of the keys' inverse covariance and the queries' covariance, the queries by T^-1: the
  map minimizing the expected squared score error when each stored key has the same
  relative error in every direction; then rotated and stored in `nvfp4_search`.

The statistics of `smooth` and `balanced` are taken over the same window they are scored
on, so they are as favourable as a calibration could be.

    python docs/ablation/key_error_experiment.py --corpus FILE --out DIR

Writes results.json, results.md and attention_kl_by_head.png to DIR; about 8 minutes
on 2 CPU cores for two windows of 2,048 tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fp4kv_jax import ablate
from fp4kv_jax.formats import dequantize, get_codec, quantize
from fp4kv_jax.models import loading, transformer
from fp4kv_jax.rotation import hadamard_matrix

# (treatment, key format, smoothing exponent or "balanced" or None)
TREATMENTS = (
    ("nvfp4_search", "nvfp4_search", None),
    ("nvfp4_search_b8", "nvfp4_search_b8", None),
    ("nvfp4_search_b4", "nvfp4_search_b4", None),
    ("mxfp4", "mxfp4", None),
    ("fp8_e4m3", "fp8_e4m3", None),
    ("nvfp4_search, smooth=0.5", "nvfp4_search", 0.5),
    ("nvfp4_search, smooth=1", "nvfp4_search", 1.0),
    ("nvfp4_search, balanced", "nvfp4_search", "balanced"),
)


def parse_model_and_windows(description: str, calibration: bool = False):
    """Parses --corpus, --context, --windows and --out (and --calibration, a text file,
    default None: Shakespeare); returns (the arguments, SmolLM2-135M in float32, the
    corpus's name, the token windows int [W, context])."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--corpus", required=True, help="UTF-8 text file")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--out", required=True)
    if calibration:
        parser.add_argument("--calibration", help="UTF-8 text file (default: Shakespeare)")
    args = parser.parse_args()
    model = loading.from_pretrained("smollm2-135m", jnp.float32)
    corpus_name, texts = ablate.load_corpus(args.corpus)
    token_ids = ablate.tokenize_texts(model.tokenizer, texts)
    return args, model, corpus_name, ablate.corpus_windows(token_ids, args.context, args.context * args.windows)


def captured(model, windows: np.ndarray, record) -> list[tuple[np.ndarray, ...]]:
    """Per layer, the arrays `record(q, k, positions, rope)` returns for a window (q
    [1, T, Hq, D] and k [1, T, Hkv, D] after RoPE, as `Attention.project` gives them),
    each stacked over the windows, from an uncached forward pass over each window."""
    layers = []
    project = transformer.Attention.project

    def recording(self, x, positions, rope):
        q, k, v = project(self, x, positions, rope)
        layers.append(record(q, k, positions, rope))
        return q, k, v

    transformer.Attention.project = recording
    try:
        per_window = []
        for window in windows:
            layers.clear()
            model(jnp.asarray(window[None]))
            per_window.append(list(layers))
    finally:
        transformer.Attention.project = project
    return [tuple(np.stack(parts) for parts in zip(*layer)) for layer in zip(*per_window)]


def queries_and_keys(q, k, positions, rope) -> tuple[np.ndarray, np.ndarray]:
    """`captured`'s record of (q [T, Hq, D], k [T, Hkv, D]) after RoPE, float32."""
    del positions, rope
    return np.asarray(q[0], np.float32), np.asarray(k[0], np.float32)


def write_results(out: str, results: dict, table: str) -> Path:
    """Writes results.json and results.md (`table`) into the folder `out`; prints the table."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (folder / "results.md").write_text(table)
    print(table)
    return folder


def _symmetric_power(matrix: np.ndarray, power: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.clip(values, 1e-12, None) ** power) @ vectors.T


def key_map(q: np.ndarray, k: np.ndarray, how) -> np.ndarray:
    """float64 [D, D]: the exact map the keys are multiplied by before the rotation (the
    queries by its inverse transpose), for q [T, G, D], centered k [T, D]."""
    head_dim = k.shape[-1]
    queries = q.reshape(-1, head_dim).astype(np.float64)
    keys = k.astype(np.float64)
    if how is None:
        return np.eye(head_dim)
    if how == "balanced":
        key_cov = keys.T @ keys / len(keys)
        key_cov += 1e-6 * np.trace(key_cov) / head_dim * np.eye(head_dim)
        query_cov = queries.T @ queries / len(queries)
        root, inverse_root = _symmetric_power(key_cov, 0.5), _symmetric_power(key_cov, -0.5)
        squared = inverse_root @ _symmetric_power(root @ query_cov @ root, 0.5) @ inverse_root
        mapped = _symmetric_power(squared, 0.5)
    else:  # HF RoPE pairs channel i with i + D/2
        pair = lambda x: np.mean(x[:, : head_dim // 2] ** 2 + x[:, head_dim // 2 :] ** 2, axis=0)
        factor = (pair(queries) / pair(keys)) ** (how / 4)
        mapped = np.diag(np.concatenate([factor, factor]))
    return mapped / np.exp(np.mean(np.log(np.linalg.eigvalsh(mapped))))  # determinant 1


def stored_keys(k: np.ndarray, mapped: np.ndarray, fmt: str) -> np.ndarray:
    """k [T, D] as attention reads it back from `fmt` after the map and the rotation."""
    rotation = hadamard_matrix(k.shape[-1]).astype(np.float64)
    stored = quantize(jnp.asarray(k @ mapped @ rotation, jnp.float32), fmt)
    return np.asarray(dequantize(stored), np.float64) @ rotation.T @ np.linalg.inv(mapped)


@jax.jit
def attention_kl(q: jax.Array, k: jax.Array, key_error: jax.Array) -> jax.Array:
    """float32 []: mean over queries of KL(exact || with key_error), summed over the G
    query heads. q [G, T, D]; k, key_error [T, D]."""
    length = k.shape[0]
    scale = k.shape[-1] ** -0.5
    causal = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
    scores = jnp.einsum("gtd,pd->gtp", q, k, precision="highest") * scale
    shifted = scores + jnp.einsum("gtd,pd->gtp", q, key_error, precision="highest") * scale
    exact = jax.nn.log_softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    moved = jax.nn.log_softmax(jnp.where(causal, shifted, -jnp.inf), axis=-1)
    terms = jnp.where(causal, jnp.exp(exact) * (exact - moved), 0.0)
    return jnp.sum(jnp.mean(jnp.sum(terms, axis=-1), axis=-1))


def score_treatment(layers, fmt: str, how) -> tuple[np.ndarray, float]:
    """(attention KL float64 [layers, Hkv], the keys' relative error over all layers)."""
    kl = np.zeros((len(layers), layers[0][1].shape[2]))
    error, norm = 0.0, 0.0
    for layer, (q, k) in enumerate(layers):
        windows, _, num_heads, _ = q.shape
        kv_heads = k.shape[2]
        group = num_heads // kv_heads
        for w in range(windows):
            centered = k[w] - k[w].mean(axis=0)
            for head in range(kv_heads):
                q_head = q[w, :, head * group : (head + 1) * group]
                key = centered[:, head].astype(np.float64)
                miss = stored_keys(key, key_map(q_head, key, how), fmt) - key
                error, norm = error + np.sum(miss**2), norm + np.sum(key**2)
                kl[layer, head] += float(attention_kl(
                    jnp.asarray(q_head.transpose(1, 0, 2)), jnp.asarray(key, jnp.float32),
                    jnp.asarray(miss, jnp.float32),
                )) / windows
    return kl, float(np.sqrt(error / norm))


def top_share(kl: np.ndarray, fraction: float = 0.1) -> float:
    """The share of the summed attention KL in the `fraction` of heads with the most."""
    ordered = np.sort(kl.ravel())[::-1]
    return float(ordered[: max(1, round(fraction * ordered.size))].sum() / ordered.sum())


def markdown(results: dict, keys: str = "keys (centered, Hadamard-rotated)", baseline: str = "nvfp4_search") -> str:
    """The treatments' table, their attention KL against the first row's (`baseline`),
    with a column of bits where the rows have them."""
    rows = results["treatments"]
    base = rows[0]["attention_kl_sum"]
    has_bits = "bits" in rows[0]
    lines = [
        f"| {keys} |" + (" bits/key elem |" if has_bits else "")
        + f" K err | attention KL (sum) | vs {baseline} | top 10% heads' share |",
        "|---|" + "---:|" * (4 + has_bits),
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} |" + (f" {row['bits']:g} |" if has_bits else "")
            + f" {row['key_error']:.4f} | {row['attention_kl_sum']:.3f} "
            f"| {row['attention_kl_sum'] / base:.2f}x | {row['top_share']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def plot_by_head(kl: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 2.6))
    image = axis.imshow(kl.T, aspect="auto", cmap="viridis")
    axis.set_xlabel("layer")
    axis.set_ylabel("KV head")
    axis.set_yticks(range(kl.shape[1]))
    axis.set_title("attention KL of each KV head (nats, summed over its query heads), nvfp4_search keys")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    args, model, corpus_name, windows = parse_model_and_windows(__doc__.split("\n\n")[0])
    layers = captured(model, windows, queries_and_keys)
    rows = []
    head_dim = layers[0][1].shape[-1]
    for name, fmt, how in TREATMENTS:
        kl, key_error = score_treatment(layers, fmt, how)
        bits = get_codec(fmt).bits_per_element(head_dim)
        rows.append(dict(name=name, bits=bits, key_error=key_error, attention_kl_sum=float(kl.sum()),
                         top_share=top_share(kl), attention_kl=kl.tolist()))
        print(f"{name}: attention KL {kl.sum():.3f}, K err {key_error:.4f}", file=sys.stderr, flush=True)
    results = dict(
        config=dict(model="smollm2-135m", corpus=corpus_name, context=args.context, windows=len(windows),
                    jax=jax.__version__, device=jax.devices()[0].device_kind),
        treatments=rows,
    )
    out = write_results(args.out, results, markdown(results))
    plot_by_head(np.asarray(rows[0]["attention_kl"]), out / "attention_kl_by_head.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
