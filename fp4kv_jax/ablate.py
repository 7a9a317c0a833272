"""`fp4kv ablate`: what each KV-cache dtype costs and buys, on a real model and real text.

Every row is a cache recipe: a cache dtype, optionally with accuracy options
("nvfp4+hadamard"), named by that string (`recipe_from_name`). A row
scores the same token windows, one prefill per window, with attention reading keys
and values back as stored in the row's cache, and is compared token by token with the
reference row (bf16): perplexity and its change with a paired block-bootstrap
interval, KL of the next-token distributions, top-1 agreement, greedy-continuation
agreement, per-layer relative error of K, V and attention outputs, and the cache's
memory figures. Outputs: results.json, results.md and PNG plots (see
`fp4kv_jax.ablate_plots`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fp4kv_jax import cache as kv_cache
from fp4kv_jax import key_rounding
from fp4kv_jax.generate import generate
from fp4kv_jax.memory import fixed_bytes_per_sequence, kv_cache_bytes_per_token, max_cache_tokens
from fp4kv_jax.recipes import CacheRecipe, recipe_from_name

_GIB = 1024**3
AMORTIZED_OVER = 8192  # positions over which a recipe's fixed bytes per sequence count in its bits
REFERENCE = "bf16"
# "+round_keys" rows calibrate their query moments on this many windows of this many
# tokens of the calibration text.
CALIBRATION_WINDOWS = 2
CALIBRATION_CONTEXT = 2048
# The three per-layer tensors whose relative error each row reports, in this order.
LAYER_TENSORS = ("k", "v", "attention_output")


@dataclasses.dataclass(frozen=True)
class AblationSettings:
    """How rows are compared; recorded in results.json.

    Attributes:
      prompt_tokens: tokens per greedy-continuation prompt (at most the window's).
      greedy_tokens: greedy tokens generated per prompt (no token ends a continuation).
      block_tokens: consecutive scored tokens per bootstrap block (never across windows).
      resamples: bootstrap resamples.
      seed: the bootstrap's random seed.
      position_buckets: equal runs of window positions for the error-by-position figures.
      budget_gib: the memory budget, GiB, for `tokens_in_budget` (one sequence).
    """

    prompt_tokens: int = 64
    greedy_tokens: int = 16
    block_tokens: int = 32
    resamples: int = 2000
    seed: int = 0
    position_buckets: int = 8
    budget_gib: float = 1.0


def tokenize_texts(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """int32 [N]: the token ids of the texts, one after another."""
    encodings = tokenizer.encode_batch(list(texts))
    return np.concatenate([np.asarray(e.ids, np.int32) for e in encodings])


def corpus_windows(token_ids: np.ndarray, context: int, max_scored_tokens: int) -> np.ndarray:
    """int32 [W, context]: non-overlapping windows spread evenly over `token_ids` [N].

    Each window scores its last context - 1 tokens, so W is the most windows whose
    scored tokens stay within `max_scored_tokens` and that the corpus holds side by side.
    """
    if context < 2:
        raise ValueError(f"context: a window needs at least 2 tokens, got {context}.")
    available = len(token_ids) // context
    if available == 0:
        raise ValueError(
            f"corpus: {len(token_ids)} tokens cannot fill one window of context={context} tokens."
        )
    count = min(max_scored_tokens // (context - 1), available)
    if count == 0:
        raise ValueError(
            f"max_scored_tokens: {max_scored_tokens} is fewer than the {context - 1} tokens "
            "one window scores."
        )
    # The tokens no window takes are shared out evenly between the windows, so the
    # windows sample the whole corpus: the first starts it and the last ends it.
    spare = len(token_ids) - count * context
    gaps = np.arange(count) * spare // max(count - 1, 1)
    starts = gaps + np.arange(count) * context
    return np.stack([token_ids[s : s + context] for s in starts]).astype(np.int32)


def corpus_prompts(token_ids: np.ndarray, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` token ids each, starting evenly over `token_ids` [N]."""
    if len(token_ids) < length:
        raise ValueError(f"corpus: {len(token_ids)} tokens cannot fill a prompt of {length}.")
    starts = np.linspace(0, len(token_ids) - length, count).astype(int)
    return [token_ids[s : s + length].tolist() for s in starts]


class WindowPass(NamedTuple):
    """One row's forward pass over windows input_ids [B, T] through its cache.

    Attributes:
      log_probs: float32 [B, T-1, V], log-softmax of the predictions of tokens 1..T-1.
      nll: float32 [B, T-1], negative log-likelihood (nats) of tokens 1..T-1.
      keys, values: per layer float32 [B, Hkv, T, D], read back from the cache as stored.
      attention_outputs: per layer float32 [B, T, hidden], the attention block's output
        (after o_proj), before it joins the residual stream.
    """

    log_probs: jax.Array
    nll: jax.Array
    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    attention_outputs: tuple[jax.Array, ...]


def _forward(model, input_ids, cache):
    return model(input_ids, cache=cache)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _window_pass(graphdef, state, input_ids, cache) -> WindowPass:
    model = nnx.merge(graphdef, state)
    # method_outputs sows every module method's return value; each attention layer's
    # __call__ returns (output, cache), and only what this function returns is kept.
    capture = nnx.capture(_forward, nnx.Intermediate, method_outputs=nnx.Intermediate)
    (logits, cache), intermediates = capture(model, input_ids, cache)
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    targets = input_ids[:, 1:, None]
    nll = -jnp.take_along_axis(log_probs, targets, axis=-1)[..., 0]
    layers = range(len(cache.layers))
    stored = [kv_cache.read_layer(cache, layer) for layer in layers]
    outputs = tuple(
        intermediates["layers"][layer]["self_attn"]["__call__"].get_value()[0][0].astype(jnp.float32)
        for layer in layers
    )
    return WindowPass(
        log_probs=log_probs,
        nll=nll,
        keys=tuple(k for k, _, _ in stored),
        values=tuple(v for _, v, _ in stored),
        attention_outputs=outputs,
    )


def score_window(
    model, input_ids: np.ndarray, recipe: CacheRecipe, query_moments: np.ndarray | None = None
) -> WindowPass:
    """One prefill of windows input_ids int [B, T] through a fresh cache of `recipe`
    (with `query_moments` for a recipe that rounds keys).

    Compiled once per window shape and cache pytree (so once per cache dtype).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    graphdef, state = nnx.split(model)
    cache = recipe.build_cache(model, *input_ids.shape, query_moments=query_moments)
    return _window_pass(graphdef, state, input_ids, cache)


class WindowComparison(NamedTuple):
    """A row's pass against the reference's pass over the same windows [B, T].

    Attributes:
      kl: float32 [B, T-1], KL(reference || row) in nats of each next-token distribution.
      top1_match: bool [B, T-1], whether both rank the same next token first.
      squared_error: float32 [3, L], per LAYER_TENSORS and layer, the summed squared
        difference between the row's and the reference's tensor.
      reference_squared: float32 [3, L], the reference tensor's summed squares.
    """

    kl: jax.Array
    top1_match: jax.Array
    squared_error: jax.Array
    reference_squared: jax.Array


@jax.jit
def compare_passes(row: WindowPass, reference: WindowPass) -> WindowComparison:
    """Token and layer statistics of `row` against `reference` (same windows)."""
    kl = jnp.sum(jnp.exp(reference.log_probs) * (reference.log_probs - row.log_probs), axis=-1)
    top1 = jnp.argmax(row.log_probs, axis=-1) == jnp.argmax(reference.log_probs, axis=-1)
    pairs = [
        (row.keys, reference.keys),
        (row.values, reference.values),
        (row.attention_outputs, reference.attention_outputs),
    ]
    squared_error = jnp.stack(
        [jnp.stack([jnp.sum((a - b) ** 2) for a, b in zip(mine, ref)]) for mine, ref in pairs]
    )
    reference_squared = jnp.stack([jnp.stack([jnp.sum(b**2) for b in ref]) for _, ref in pairs])
    return WindowComparison(kl, top1, squared_error, reference_squared)


def paired_block_bootstrap(
    nll: np.ndarray,
    reference_nll: np.ndarray,
    *,
    block_tokens: int,
    resamples: int,
    seed: int,
) -> tuple[float, float]:
    """The 95% interval of the perplexity change, in %, of a row against the reference.

    Args:
      nll, reference_nll: float [W, S], per-token NLL (nats) of the same S scored tokens
        of W windows under the row and the reference.
      block_tokens: consecutive tokens per block; a window's last block may be shorter.
        Blocks, not tokens, are resampled (with replacement), the same blocks for both,
        so that neighbouring tokens' correlated errors stay together.
      resamples, seed: the number of resamples and the seed that makes them reproducible.

    Returns:
      (low, high): the 2.5th and 97.5th percentiles of 100 * (ppl / ppl_reference - 1).
    """
    block_of = np.arange(nll.shape[1]) // block_tokens
    difference = np.asarray(nll, np.float64) - np.asarray(reference_nll, np.float64)
    block_sums = np.concatenate([np.bincount(block_of, weights=window) for window in difference])
    block_counts = np.tile(np.bincount(block_of), len(difference))
    picks = np.random.default_rng(seed).integers(0, len(block_sums), (resamples, len(block_sums)))
    mean_difference = block_sums[picks].sum(axis=1) / block_counts[picks].sum(axis=1)
    low, high = np.percentile(100 * np.expm1(mean_difference), [2.5, 97.5])
    return float(low), float(high)


def matching_prefix_length(tokens: Sequence[int], reference: Sequence[int]) -> int:
    """How many leading tokens `tokens` shares with `reference`."""
    for index, (mine, theirs) in enumerate(zip(tokens, reference)):
        if mine != theirs:
            return index
    return min(len(tokens), len(reference))


def _position_runs(scored: int, buckets: int) -> list[list[int]]:
    """The scored window positions 1..scored, split into at most `buckets` equal runs."""
    return [run.tolist() for run in np.array_split(np.arange(1, scored + 1), min(buckets, scored))]


@dataclasses.dataclass
class _Tally:
    """What one row gathers over the windows.

    Attributes:
      nll, kl, top1_match: per window, float32 / bool [T-1] per scored token.
      squared_error, reference_squared: float64 [3, L], summed over the windows (see
        `WindowComparison`).
    """

    nll: list[np.ndarray] = dataclasses.field(default_factory=list)
    kl: list[np.ndarray] = dataclasses.field(default_factory=list)
    top1_match: list[np.ndarray] = dataclasses.field(default_factory=list)
    squared_error: np.ndarray | float = 0.0
    reference_squared: np.ndarray | float = 0.0

    def add(self, row: WindowPass, comparison: WindowComparison) -> None:
        """Adds one window's pass (a batch of one) and its comparison."""
        self.nll.append(np.asarray(row.nll[0]))
        self.kl.append(np.asarray(comparison.kl[0]))
        self.top1_match.append(np.asarray(comparison.top1_match[0]))
        self.squared_error = self.squared_error + np.asarray(comparison.squared_error, np.float64)
        self.reference_squared = self.reference_squared + np.asarray(
            comparison.reference_squared, np.float64
        )


def _row(
    model,
    recipe: CacheRecipe,
    tally: _Tally,
    reference: _Tally,
    greedy_matches: list[int],
    settings: AblationSettings,
) -> dict:
    """One row of results.json from what the row gathered (see `run_ablation`)."""
    config = model.config
    nll = np.stack(tally.nll).astype(np.float64)
    reference_nll = np.stack(reference.nll).astype(np.float64)
    kl = np.stack(tally.kl)
    low, high = paired_block_bootstrap(
        nll, reference_nll, block_tokens=settings.block_tokens, resamples=settings.resamples,
        seed=settings.seed,
    )
    relative_error = np.sqrt(tally.squared_error / tally.reference_squared)
    bytes_per_token = kv_cache_bytes_per_token(config, **recipe.storage)
    elements_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
    # What a sequence holds whatever its length (positions kept in bf16, a mean key) is
    # amortized over 8k positions.
    fixed = fixed_bytes_per_sequence(config, **{
        name: recipe.storage[name]
        for name in ("keep_first", "keep_recent", "kept_dtype", "center_keys", "center_values")
        if name in recipe.storage
    })
    kl_by_position = kl.mean(axis=0)
    runs = _position_runs(nll.shape[1], settings.position_buckets)
    return {
        "name": recipe.name,
        "cache_dtype": recipe.cache_dtype,
        "cache_options": dict(recipe.options),
        "perplexity": float(np.exp(nll.mean())),
        "delta_ppl_pct": float(100 * np.expm1(nll.mean() - reference_nll.mean())),
        "delta_ppl_ci95": [low, high],
        "kl": float(kl.mean()),
        "top1_agreement": float(np.stack(tally.top1_match).mean()),
        "greedy_agreement": float(np.mean(greedy_matches)),
        "bits_per_element": 8 * (bytes_per_token + fixed / AMORTIZED_OVER) / elements_per_token,
        "bytes_per_token": bytes_per_token,
        "tokens_in_budget": max_cache_tokens(
            config, budget_bytes=int(settings.budget_gib * _GIB), **recipe.storage
        ),
        "layer_errors": {
            tensor: relative_error[index].tolist() for index, tensor in enumerate(LAYER_TENSORS)
        },
        "kl_by_position": [float(kl_by_position[np.asarray(run) - 1].mean()) for run in runs],
    }


def run_ablation(
    model,
    windows: np.ndarray,
    prompts: Sequence[Sequence[int]],
    recipes: Sequence[CacheRecipe],
    settings: AblationSettings = AblationSettings(),
    *,
    reference: str = REFERENCE,
    progress: bool = True,
    query_moments: np.ndarray | None = None,
) -> list[dict]:
    """Scores every recipe on `windows` and compares it with the reference recipe.

    Args:
      model: a model from `fp4kv_jax.models`.
      windows: int32 [W, T] token windows, scored one at a time.
      prompts: token-id lists for the greedy continuations.
      recipes: the rows, in output order; names must be unique and include `reference`.
      reference: the name of the row the others are measured against.
      progress: show a tqdm bar on stderr.
      query_moments: the calibrated query moments that "+round_keys" rows round their
        keys against (`calibration_moments`).

    Returns:
      One dict per recipe, in order:
        name, cache_dtype, cache_options: the recipe.
        perplexity: exp of the mean NLL over all scored tokens.
        delta_ppl_pct, delta_ppl_ci95: 100 * (perplexity / reference's - 1) and its 95%
          paired block-bootstrap interval [low, high].
        kl: mean KL(reference || row) in nats over scored tokens.
        top1_agreement: fraction of scored tokens whose top-ranked next token is the
          reference's.
        greedy_agreement: greedy tokens equal to the reference's continuation until the
          first divergence, mean over prompts (at most settings.greedy_tokens).
        bits_per_element, bytes_per_token, tokens_in_budget: the cache's memory figures
          (budget settings.budget_gib, one sequence); bits_per_element counts what a
          recipe holds per sequence whatever its length (positions kept in bf16, mean
          keys and values) amortized over AMORTIZED_OVER positions.
        layer_errors: {"k", "v", "attention_output"}: per layer ||x - x_ref|| / ||x_ref||
          over all windows.
        kl_by_position: mean KL per run of window positions (`position_buckets` runs).
    """
    from tqdm import tqdm

    names = [recipe.name for recipe in recipes]
    if len(set(names)) != len(names):
        raise ValueError(f"recipes: names must be unique, got {names}.")
    if reference not in names:
        raise ValueError(f"recipes: the reference {reference!r} is not among {names}.")
    # The reference goes first in every window: the other rows are compared with it.
    ordered = sorted(recipes, key=lambda recipe: recipe.name != reference)
    tallies = {name: _Tally() for name in names}
    bar = tqdm(
        total=(len(windows) + 1) * len(recipes), desc="ablate", unit="pass", file=sys.stderr,
        disable=not progress,
    )
    for window in windows:
        for recipe in ordered:
            bar.set_postfix_str(f"{recipe.name}, scoring")
            row_pass = score_window(model, window[None], recipe, query_moments)
            if recipe.name == reference:
                reference_pass = row_pass
            tallies[recipe.name].add(row_pass, jax.device_get(compare_passes(row_pass, reference_pass)))
            bar.update()
    continuations = {}
    for recipe in ordered:
        bar.set_postfix_str(f"{recipe.name}, greedy")
        continuations[recipe.name] = generate(
            model, prompts, max_new_tokens=settings.greedy_tokens, cache_dtype=recipe.cache_dtype,
            cache_options=recipe.cache_options(query_moments), eos_token_ids=(),  # every continuation runs its full length
        ).tokens
        bar.update()
    bar.close()
    return [
        _row(
            model, recipe, tallies[recipe.name], tallies[reference],
            [
                matching_prefix_length(mine, theirs)
                for mine, theirs in zip(continuations[recipe.name], continuations[reference])
            ],
            settings,
        )
        for recipe in recipes
    ]


def load_corpus(path: str | Path | None, arg: str = "--corpus") -> tuple[str, list[str]]:
    """(name, texts): a UTF-8 text file, or the Shakespeare texts when `path` is None;
    errors name the option `arg`."""
    if path is None:
        from fp4kv_jax.corpus import shakespeare_texts

        return "shakespeare", list(shakespeare_texts().values())
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{arg}: {str(path)!r} is not a file.")
    try:
        return str(path), [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as error:
        raise ValueError(f"{arg}: {str(path)!r} is not UTF-8 text ({error.reason}).") from None


def default_calibration(scored_corpus: str | Path | None) -> tuple[str, list[str]]:
    """The calibration text of "+round_keys" rows when none is given: a built-in text
    other than the one scored, so that no row is calibrated on what it is scored on.
    The Python docs (the standard library's pydoc_data topics) when `scored_corpus` is
    the Shakespeare default (None), else Shakespeare."""
    if scored_corpus is not None:
        return load_corpus(None)
    import pydoc_data.topics

    return load_corpus(pydoc_data.topics.__file__)


def calibration_moments(
    model, texts: Sequence[str], windows: int = CALIBRATION_WINDOWS, context: int = CALIBRATION_CONTEXT
) -> np.ndarray:
    """float32 [layers, Hkv, D, D]: `key_rounding.query_moments` over `windows` windows
    of `context` tokens spread over the texts."""
    token_ids = tokenize_texts(model.tokenizer, texts)
    context = min(context, len(token_ids))
    return key_rounding.query_moments(model, corpus_windows(token_ids, context, windows * (context - 1)))


def ablate(
    model,
    model_name: str,
    corpus_name: str,
    texts: Sequence[str],
    cache_dtypes: Sequence[str],
    *,
    context: int,
    tokens: int,
    prompts: int,
    settings: AblationSettings = AblationSettings(),
    progress: bool = True,
    calibration: tuple[str, Sequence[str]] | None = None,
) -> dict:
    """The whole ablation of `fp4kv ablate`: windows and prompts from the texts, then rows.

    Args:
      model: a model with a tokenizer; model_name is what the results call it.
      corpus_name, texts: the corpus, as `load_corpus` returns it.
      cache_dtypes: the rows, as names `recipe_from_name` reads; bf16, the reference,
        is put first when missing.
      context: tokens per window; tokens: scored tokens in all, at most.
      prompts: greedy-continuation prompts.
      calibration: (name, texts) of the text "+round_keys" rows calibrate on; needed
        only when a row rounds keys.

    Returns:
      {"config": {...}, "results": [row, ...]}, rows as `run_ablation` makes them.
    """
    token_ids = tokenize_texts(model.tokenizer, texts)
    windows = corpus_windows(token_ids, context, tokens)
    prompt_ids = corpus_prompts(token_ids, prompts, min(settings.prompt_tokens, context))
    names = list(dict.fromkeys([REFERENCE, *cache_dtypes]))
    recipes = [recipe_from_name(name) for name in names]
    query_moments, calibration_name = None, None
    if any(recipe.rounds_keys for recipe in recipes):
        if calibration is None:
            raise ValueError("calibration: rows with +round_keys need a calibration text (name, texts).")
        calibration_name, calibration_texts = calibration
        query_moments = calibration_moments(model, calibration_texts)
    rows = run_ablation(
        model, windows, prompt_ids, recipes, settings, progress=progress, query_moments=query_moments,
    )
    scored = windows.shape[1] - 1
    config = {
        "model": model_name,
        "parameter_dtype": jnp.dtype(model.dtype).name,
        "corpus": corpus_name,
        "corpus_tokens": len(token_ids),
        "cache_dtypes": names,
        "calibration": calibration_name,
        "reference": REFERENCE,
        "context": context,
        "tokens": tokens,
        "windows": len(windows),
        "scored_tokens": len(windows) * scored,
        "prompts": prompts,
        "position_bucket_starts": [run[0] for run in _position_runs(scored, settings.position_buckets)],
        **dataclasses.asdict(settings),
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
    }
    return {"config": config, "results": rows}


def markdown_table(results: dict) -> str:
    """results.md: a one-line summary of the run and one table row per cache dtype."""
    c = results["config"]
    lines = [
        f"KV-cache ablation of {c['model']} ({c['parameter_dtype']} parameters) on {c['corpus']}: "
        f"{c['scored_tokens']:,} scored tokens in {c['windows']} windows of {c['context']}; "
        f"reference {c['reference']}; greedy agreement over {c['prompts']} prompts of "
        f"{c['greedy_tokens']} tokens; memory budget {c['budget_gib']:g} GiB.",
        "",
        "| cache dtype | bits/elem | bytes/token | tokens in budget | PPL | ΔPPL % [95% CI] "
        "| KL (nats) | top-1 agree | greedy match | K err | V err | attn-out err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["results"]:
        low, high = row["delta_ppl_ci95"]
        errors = [np.mean(row["layer_errors"][tensor]) for tensor in LAYER_TENSORS]
        lines.append(
            f"| {row['name']} | {row['bits_per_element']:.3g} | {row['bytes_per_token']:,} "
            f"| {row['tokens_in_budget']:,} | {row['perplexity']:.3f} "
            f"| {row['delta_ppl_pct']:+.2f} [{low:+.2f}, {high:+.2f}] | {row['kl']:.2e} "
            f"| {100 * row['top1_agreement']:.1f}% "
            f"| {row['greedy_agreement']:.1f}/{c['greedy_tokens']} "
            + "".join(f"| {error:.3g} " for error in errors)
            + "|"
        )
    lines += ["", "Errors are relative Frobenius norms against the reference, averaged over layers."]
    return "\n".join(lines)


def write_outputs(results: dict, out_dir: str | Path) -> list[Path]:
    """Writes results.json, results.md and the plots into `out_dir`; returns their paths."""
    from fp4kv_jax.ablate_plots import write_plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=1))
    markdown_path = out_dir / "results.md"
    markdown_path.write_text(markdown_table(results) + "\n")
    return [json_path, markdown_path, *write_plots(results, out_dir)]
