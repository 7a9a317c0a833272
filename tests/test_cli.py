"""`fp4kv memory` prints one row per cache dtype and reproduces SPEC's figures; `fp4kv
generate` streams text; `fp4kv ablate` checks its arguments, then writes and prints its
results."""

import subprocess
import sys

import pytest

from fp4kv_jax.cli import main


def test_memory_table_reproduces_spec_bytes_per_token(capsys):
    assert main(["memory", "--model", "qwen3-235b-a22b", "--budget-gib", "80",
                 "--cache-dtypes", "bf16,fp8_e4m3,fp4_e2m1"]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert "| 192,512 |" in rows["bf16"] and "| 1.00x |" in rows["bf16"]
    assert "| 96,256 |" in rows["fp8_e4m3"] and "| 2.00x |" in rows["fp8_e4m3"]
    assert "| 54,144 |" in rows["fp4_e2m1"] and "| 3.56x |" in rows["fp4_e2m1"]


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["memory", "--model", "gpt-9"]) == 2
    err = capsys.readouterr().err
    assert "--model: 'gpt-9'" in err and "smollm2-135m" in err


def test_unknown_cache_dtype_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main(["memory", "--cache-dtypes", "bf16,int3"])
    assert "valid: float32, bf16" in capsys.readouterr().err


def test_unknown_recipe_suffix_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main(["ablate", "--cache-dtypes", "bf16,nvfp4+rotate"])
    assert "unknown recipe suffix(es) ['rotate'] in 'nvfp4+rotate'; valid: +hadamard" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "fp4kv_jax.cli", "memory", "--cache-dtypes", "bf16"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "smollm2-135m" in out and "| bf16 |" in out


def test_generate_streams_the_text_then_reports_speed_with_a_recipe_cache(capsys):
    assert main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "3",
                 "--cache-dtype", "nvfp4+hadamard", "--float32"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(" Paris")
    assert "tokens/s" in captured.err and "nvfp4+hadamard" in captured.err


def test_generate_refuses_a_model_without_tokenizer(capsys):
    from pathlib import Path

    fixture = Path(__file__).resolve().parent / "fixtures" / "qwen3"
    assert main(["generate", "--model", str(fixture), "--prompt", "hi"]) == 2
    assert "--model" in capsys.readouterr().err


def test_generate_refuses_a_missing_calibration_text_by_name(capsys):
    arguments = ["--cache-dtype", "nvfp4+round_keys", "--calibration", "/no/such.txt", "--prompt", "hi"]
    assert main(["generate", *arguments]) == 2
    assert "--calibration: '/no/such.txt' is not a file" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--context", "1"], "--context: a window needs at least 2 tokens"),
    (["--context", "64", "--tokens", "32"], "--tokens: must be at least --context (64)"),
    (["--prompts", "0"], "--prompts: must be at least 1"),
    (["--corpus", "/no/such/corpus.txt"], "--corpus: '/no/such/corpus.txt' is not a file"),
    (["--cache-dtypes", "bf16+round_keys"], "--cache-dtypes: bf16+round_keys: query_moments: query-aware rounding"),
    (["--cache-dtypes", "nvfp4+round_keys", "--calibration", "/no/such.txt"], "--calibration: '/no/such.txt' is not"),
])
def test_ablate_refuses_bad_arguments_before_any_work(capsys, arguments, message):
    assert main(["ablate", *arguments]) == 2
    assert message in capsys.readouterr().err


def test_ablate_writes_results_and_prints_their_table(capsys, tmp_path):
    import json

    assert main(["ablate", "--cache-dtypes", "fp8_e4m3", "--context", "24", "--tokens", "46",
                 "--prompts", "2", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    bf16, fp8 = results["results"]
    assert (bf16["name"], fp8["name"]) == ("bf16", "fp8_e4m3")
    assert results["config"]["scored_tokens"] == 46 and results["config"]["corpus"] == "shakespeare"
    assert 1.5 < bf16["perplexity"] < 500 and fp8["kl"] > 0 and fp8["bits_per_element"] == 8
    assert capsys.readouterr().out.strip() == (tmp_path / "results.md").read_text().strip()


def test_ablate_on_gpu_needs_a_gpu(capsys):
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    assert main(["ablate", "--device", "gpu"]) == 2
    assert "--device: JAX sees no gpu device; valid here: cpu" in capsys.readouterr().err
