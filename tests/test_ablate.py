"""`fp4kv_jax.ablate`: windowed scoring through a quantized cache, rows compared with
the bf16 reference, the paired block bootstrap, and the files written.

The tiny Llama fixture (tests/fixtures/llama, vocab 128, head_dim 16) keeps this fast;
the SmolLM2 run of the whole command is in tests/test_cli.py.
"""

import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4kv_jax import key_rounding
from fp4kv_jax.ablate import (
    AblationSettings,
    ablate,
    corpus_windows,
    load_corpus,
    matching_prefix_length,
    paired_block_bootstrap,
    score_window,
    tokenize_texts,
    write_outputs,
)
from fp4kv_jax.memory import kv_cache_bytes_per_token, max_cache_tokens
from fp4kv_jax.recipes import recipe_from_name
from fp4kv_jax.models import from_pretrained
from fp4kv_jax.models.transformer import forward_with_cache

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROWS = ["bf16", "fp8_e4m3", "fp4_e2m1", "fp4_e2m1+keys_only"]
SETTINGS = AblationSettings(prompt_tokens=8, greedy_tokens=4, block_tokens=5, resamples=200)


class CharTokenizer:
    """One token per character, ids below the fixture's vocabulary of 128."""

    def encode_batch(self, texts):
        return [types.SimpleNamespace(ids=[ord(c) % 128 for c in text]) for text in texts]

    def decode(self, ids):
        return "".join(map(chr, ids))


@pytest.fixture(scope="module")
def llama():
    model = from_pretrained(FIXTURES / "llama", dtype=jnp.float32)
    model.tokenizer = CharTokenizer()
    return model


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("To be, or not to be, that is the question: whether 'tis nobler. " * 8)
    return path


@pytest.fixture(scope="module")
def results(llama, corpus_file):
    name, texts = load_corpus(corpus_file)
    return ablate(
        llama, "llama-fixture", name, texts, ROWS[1:], context=16, tokens=45,
        prompts=2, settings=SETTINGS, progress=False,
    )


def _rows(results):
    return {row["name"]: row for row in results["results"]}


@pytest.mark.parametrize(
    "row, length",
    [
        ("fp4_e2m1", 12),
        ("nvfp4+hadamard+hadamard_v", 12),
        ("nvfp4+values_only", 12),
        ("fp4_e2m1+first=2+recent=3+hadamard", 12),
        ("nvfp4+channel_keys+recent=16+hadamard", 30),  # key blocks fill at 15, never at 29
        ("nvfp4_search+hadamard+round_keys", 12),
    ],
)
def test_one_pass_window_score_equals_token_by_token_decode_through_the_same_cache(llama, row, length):
    with np.load(FIXTURES / "llama" / "golden.npz") as golden:
        input_ids = golden["input_ids"][:1, :length]
    recipe = recipe_from_name(row)
    moments = key_rounding.query_moments(llama, input_ids)  # for +round_keys rows
    scored = np.asarray(score_window(llama, input_ids, recipe, moments).nll[0])

    cache = recipe.build_cache(llama, 1, length, query_moments=moments)
    decoded = []
    for t in range(length - 1):
        logits, cache = forward_with_cache(llama, input_ids[:, t : t + 1], cache)
        decoded.append(-jax.nn.log_softmax(logits[0, 0])[input_ids[0, t + 1]])
    np.testing.assert_allclose(scored, decoded, rtol=1e-5, atol=1e-5)

    no_cache = -jax.nn.log_softmax(llama(input_ids)[0, :-1])[np.arange(length - 1), input_ids[0, 1:]]
    assert np.abs(scored - np.asarray(no_cache)).max() > 1e-3  # the cache's FP4 is really read


def test_rows_that_round_keys_calibrate_on_the_calibration_text_and_need_one(llama, corpus_file):
    name, texts = load_corpus(corpus_file)
    arguments = dict(context=16, tokens=15, prompts=1, settings=SETTINGS, progress=False)
    with pytest.raises(ValueError, match="calibration: rows with \\+round_keys need a calibration text"):
        ablate(llama, "llama-fixture", name, texts, ["nvfp4+round_keys"], **arguments)
    sonnet = ("sonnet", ["Shall I compare thee to a summer's day? " * 4])
    results = ablate(
        llama, "llama-fixture", name, texts, ["nvfp4", "nvfp4+round_keys"], calibration=sonnet, **arguments
    )
    assert results["config"]["calibration"] == "sonnet"
    rows = _rows(results)
    assert rows["nvfp4+round_keys"]["bytes_per_token"] == rows["nvfp4"]["bytes_per_token"]
    assert rows["nvfp4+round_keys"]["kl"] != rows["nvfp4"]["kl"]


def test_a_centered_layer_keeps_its_positions_centered_so_attention_reads_them_as_written(llama):
    with np.load(FIXTURES / "llama" / "golden.npz") as golden:
        input_ids = golden["input_ids"][:1, :12]
    # Every position kept: the FP4 store is never read, so what is left is the bf16
    # rounding of the kept copies (about 1e-2 nats here, centered or not); values kept
    # in another frame than the stored ones would move the scores by nats.
    all_kept = score_window(llama, input_ids, recipe_from_name("nvfp4+center_keys+center_values+recent=12"))
    exact = score_window(llama, input_ids, recipe_from_name("float32"))
    np.testing.assert_allclose(all_kept.nll, exact.nll, atol=2e-2)


def test_recipe_names_spell_a_cache_dtype_and_its_options():
    recipe = recipe_from_name("nvfp4+hadamard")
    assert (recipe.name, recipe.cache_dtype, dict(recipe.options)) == (
        "nvfp4+hadamard", "nvfp4", {"rotate_keys": True}
    )
    assert recipe_from_name("fp8_e4m3").options == ()
    keys_only = recipe_from_name("nvfp4+keys_only")
    assert keys_only.storage == {"cache_dtype": "nvfp4", "value_dtype": "bf16"}
    assert dict(recipe_from_name("mxfp4+values_only").options) == {"key_dtype": "bf16"}
    assert recipe_from_name("nvfp4+bf16_first=2").storage == {"cache_dtype": "nvfp4", "bf16_layers": (0, 1)}
    assert dict(recipe_from_name("nvfp4+fp8_keys").options) == {"key_dtype": "fp8_e4m3"}
    assert recipe_from_name("nvfp4_search+values=mxfp4").storage == {
        "cache_dtype": "nvfp4_search", "value_dtype": "mxfp4"
    }
    assert dict(recipe_from_name("mxfp4+keys=nvfp4").options) == {"key_dtype": "nvfp4"}
    assert recipe_from_name("nvfp4+center_keys+center_values").storage == {
        "cache_dtype": "nvfp4", "center_keys": True, "center_values": True
    }
    assert recipe_from_name("nvfp4+first=4+recent=32").storage == {
        "cache_dtype": "nvfp4", "keep_first": 4, "keep_recent": 32
    }
    assert recipe_from_name("nvfp4+recent=32+kept_fp8").storage == {
        "cache_dtype": "nvfp4", "keep_recent": 32, "kept_dtype": "fp8_e4m3"
    }
    with pytest.raises(ValueError, match=r"unknown recipe suffix\(es\) \['rotate'\].*valid: \+hadamard"):
        recipe_from_name("nvfp4+rotate")
    with pytest.raises(ValueError, match=r"\['recent=-1'\].*\+first=N, \+recent=N"):
        recipe_from_name("nvfp4+recent=-1")
    with pytest.raises(ValueError, match=r"\['bf16_first=x'\].*\+bf16_first=N"):
        recipe_from_name("nvfp4+bf16_first=x")
    with pytest.raises(ValueError, match="cache_dtype"):
        recipe_from_name("fp5+hadamard")
    with pytest.raises(ValueError, match=r"cache_dtype \(\+values=FORMAT\): unknown cache format 'fp5'.*mxfp4"):
        recipe_from_name("nvfp4+values=fp5")


def test_windows_are_contiguous_spread_over_the_corpus_and_cap_the_scored_tokens():
    windows = corpus_windows(np.arange(1000, dtype=np.int32), context=10, max_scored_tokens=40)
    assert windows.shape == (40 // 9, 10)
    np.testing.assert_array_equal(np.diff(windows, axis=1), 1)
    assert windows[0, 0] == 0 and windows[-1, -1] == 999
    assert np.all(windows[1:, 0] > windows[:-1, -1])


def test_a_short_corpus_gives_the_windows_it_holds_and_too_short_a_one_is_refused():
    assert corpus_windows(np.arange(25, dtype=np.int32), 10, 100).shape == (2, 10)
    with pytest.raises(ValueError, match="corpus: 9 tokens"):
        corpus_windows(np.arange(9, dtype=np.int32), 10, 100)


def test_bootstrap_interval_of_a_constant_nll_shift_is_that_shift():
    reference = np.random.default_rng(1).exponential(size=(3, 50))
    low, high = paired_block_bootstrap(reference + 0.1, reference, block_tokens=8, resamples=100, seed=0)
    assert low == pytest.approx(100 * np.expm1(0.1)) and high == pytest.approx(low)


def test_bootstrap_interval_is_reproducible_and_narrows_with_more_windows():
    rng = np.random.default_rng(2)
    reference = rng.exponential(size=(32, 64))
    row = reference + 0.05 + rng.normal(scale=0.5, size=reference.shape)

    def interval(windows, seed=0):
        return paired_block_bootstrap(
            row[:windows], reference[:windows], block_tokens=16, resamples=500, seed=seed
        )

    assert interval(32) == interval(32)
    assert interval(32, seed=1) != interval(32)
    (wide_low, wide_high), (low, high) = interval(2), interval(32)
    assert low < 100 * np.expm1(0.05) < high
    assert (wide_high - wide_low) > 2 * (high - low)


def test_matching_prefix_length_counts_tokens_until_the_first_divergence():
    assert matching_prefix_length([5, 6, 7, 8], [5, 6, 9, 8]) == 2
    assert matching_prefix_length([5, 6, 7], [5, 6, 7]) == 3
    assert matching_prefix_length([4, 6], [5, 6]) == 0


def test_the_reference_row_matches_itself_exactly(results):
    bf16 = _rows(results)["bf16"]
    assert bf16["delta_ppl_pct"] == 0 and bf16["delta_ppl_ci95"] == [0, 0] and bf16["kl"] == 0
    assert bf16["top1_agreement"] == 1 and bf16["greedy_agreement"] == SETTINGS.greedy_tokens
    assert all(e == 0 for errors in bf16["layer_errors"].values() for e in errors)


def test_first_layer_kv_error_is_the_formats_alone_so_fp8_beats_fp4(results):
    rows = _rows(results)
    for tensor in ("k", "v"):
        assert 0 < rows["fp8_e4m3"]["layer_errors"][tensor][0] < rows["fp4_e2m1"]["layer_errors"][tensor][0]
    assert 0 < rows["fp8_e4m3"]["kl"] < rows["fp4_e2m1"]["kl"]


def test_perplexity_is_that_of_the_one_pass_window_scores(llama, corpus_file, results):
    config = results["config"]
    token_ids = tokenize_texts(llama.tokenizer, [corpus_file.read_text()])
    windows = corpus_windows(token_ids, config["context"], config["tokens"])
    assert config["windows"] == len(windows) and config["scored_tokens"] == windows.size - len(windows)
    nll = np.concatenate([np.asarray(score_window(llama, w[None], recipe_from_name("fp4_e2m1")).nll) for w in windows])
    fp4 = _rows(results)["fp4_e2m1"]
    assert fp4["perplexity"] == pytest.approx(np.exp(nll.mean()), rel=1e-5)
    low, high = fp4["delta_ppl_ci95"]
    assert low <= fp4["delta_ppl_pct"] <= high


def test_memory_figures_come_from_the_memory_planner(llama, results):
    for row in results["results"]:
        storage = recipe_from_name(row["name"]).storage
        assert row["bytes_per_token"] == kv_cache_bytes_per_token(llama.config, **storage)
        assert row["tokens_in_budget"] == max_cache_tokens(llama.config, budget_bytes=1024**3, **storage)
    # keys_only: nvfp4 keys (4.5 bits) and bf16 values (16 bits)
    assert [row["bits_per_element"] for row in results["results"]] == [16, 8, 4.5, 10.25]


def test_outputs_hold_one_row_per_cache_dtype(results, tmp_path):
    paths = write_outputs(results, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert [row["name"] for row in written["results"]] == ROWS
    assert written["config"]["context"] == 16 and written["config"]["cache_dtypes"] == ROWS
    assert set(written["results"][0]["layer_errors"]) == {"k", "v", "attention_output"}
    assert all(len(e) == 2 for e in written["results"][0]["layer_errors"].values())
    table = (tmp_path / "results.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table if line.startswith("| ") and "---" not in line][1:] == ROWS
    pngs = [p for p in paths if p.suffix == ".png"]
    assert len(pngs) == 3 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_a_recent_window_covering_the_text_scores_like_a_bf16_cache(llama):
    with np.load(FIXTURES / "llama" / "golden.npz") as golden:
        input_ids = golden["input_ids"][:1, :12]
    bf16 = score_window(llama, input_ids, recipe_from_name("bf16")).nll[0]
    kept = score_window(llama, input_ids, recipe_from_name("fp4_e2m1+recent=12")).nll[0]
    window = score_window(llama, input_ids, recipe_from_name("fp4_e2m1+recent=4")).nll[0]
    np.testing.assert_allclose(np.asarray(kept), np.asarray(bf16), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(window)[:4], np.asarray(bf16)[:4], rtol=0, atol=1e-6)
    assert np.abs(np.asarray(window) - np.asarray(bf16))[4:].max() > 1e-3  # older keys read as FP4
