"""`fp4kv ablate` on the GPU against the CPU, on the llama fixture (no network needed).

The device machines cannot fetch SmolLM2, so this runs the ablation through the Python
API on the tiny llama fixture (head_dim 16) with a character tokenizer, once with the
GPU as the default device and once with the CPU, and prints each row's perplexity on
both. Rows on one format attend through the fused kernels on the GPU where they take
the layer (`tiles.default_implementation`); rows with mixed K/V formats through the
reference.

    python benchmarks/ablate_on_gpu.py
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp

from common import run_header
from fp4kv_jax.ablate import AblationSettings, ablate, markdown_table
from fp4kv_jax.kernels import tiles
from fp4kv_jax.models import from_pretrained

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "llama"
ROWS = ["fp4_e2m1", "nvfp4", "nvfp4+keys_only"]
TEXT = "To be, or not to be, that is the question: whether 'tis nobler. " * 8


class CharTokenizer:
    """One token per character, ids below the fixture's vocabulary of 128."""

    def encode_batch(self, texts):
        return [types.SimpleNamespace(ids=[ord(c) % 128 for c in text]) for text in texts]

    def decode(self, ids):
        return "".join(map(chr, ids))


def perplexities(platform: str) -> dict[str, float]:
    with jax.default_device(jax.devices(platform)[0]):
        model = from_pretrained(FIXTURE, dtype=jnp.float32)
        model.tokenizer = CharTokenizer()
        settings = AblationSettings(prompt_tokens=8, greedy_tokens=4, block_tokens=5, resamples=200)
        results = ablate(model, "llama-fixture", "hamlet", [TEXT], ROWS, context=16, tokens=45,
                         prompts=2, settings=settings, progress=False)
        print(f"{platform} (kernels on: {tiles.on_gpu()})\n{markdown_table(results)}")
        return {row["name"]: row["perplexity"] for row in results["results"]}


def main() -> int:
    if jax.default_backend() != "gpu":
        print("ablate_on_gpu.py: needs a GPU.", file=sys.stderr)
        return 2
    print(run_header())
    gpu, cpu = perplexities("gpu"), perplexities("cpu")
    for name in cpu:
        print(f"{name}: perplexity gpu {gpu[name]:.4f} cpu {cpu[name]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
