#!/usr/bin/env python3
"""Build tiny RANDOM Hugging Face checkpoints and their golden logits for the tests.

NOT imported by the tests (and not part of the package): it is run by hand, and only
its outputs under ``tests/fixtures/`` are committed.  It needs ``torch`` and
``transformers``, which the project itself does not depend on, so run it from a separate
Python 3.11 virtual environment:

    python3.11 -m venv /tmp/fixture-venv
    /tmp/fixture-venv/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/fixture-venv/bin/python scripts/make_golden_fixtures.py

(``torch==2.13.0`` is a CPU build available locally for Python 3.11; do NOT install
plain ``torch`` without the version pin, which pulls a multi-GB CUDA build.)

Options: ``--out DIR`` (default: ``tests/fixtures`` next to this script's repository),
``--skip-hf-mxfp4-check`` to skip loading ``gpt_oss_mxfp4`` back through transformers'
own MXFP4 dequantizer.

For each architecture in ``llama``, ``qwen2``, ``qwen3``, ``gpt_oss`` it writes
``tests/fixtures/<arch>/`` with

* ``config.json`` and ``model.safetensors`` from ``model.save_pretrained(dir,
  safe_serialization=True)`` in float32;
* ``golden.npz``: ``input_ids`` int32 [2, T] and ``logits`` float32 [2, T, vocab] from the
  HF model's full causal forward (float32, eval mode, ``use_cache=False``,
  ``attn_implementation="eager"``, no attention mask / no padding, positions 0..T-1).

and ``tests/fixtures/gpt_oss_mxfp4/``: the same gpt_oss weights, config.json and
golden.npz, but with the MoE expert matrices stored as real gpt-oss checkpoints store
them (``*_blocks`` uint8 [E, out, in/32, 16] + ``*_scales`` uint8 [E, out, in/32], E8M0
with bias 127, E2M1 nibbles with the even element in the low nibble).  The gpt_oss
expert weights are first rounded to values exactly representable in MXFP4, and the
golden logits are computed from that rounded model, so both directories share one exact
golden.npz.

Every parameter (norm weights, biases, attention sinks, router included) is re-drawn
at random after construction, with a fixed seed, so the output is deterministic for a
given torch/transformers version.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

BATCH = 2
SEQ_LEN = 32  # > gpt_oss sliding_window (8), so the window matters
VOCAB = 128
SEED = 20240917

# E2M1 magnitudes, indexed by the 3 low bits of a code; bit 3 is the sign.
E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float64)
MX_BLOCK = 32


# --------------------------------------------------------------------------- configs


def make_config(arch: str):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    if arch == "llama":
        # SmolLM2-like: tied embeddings, non-default rope_theta.
        return transformers.LlamaConfig(
            **common,
            intermediate_size=96,
            num_hidden_layers=2,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        )
    if arch == "qwen2":
        # Qwen2: q/k/v biases are built in (no config switch); o_proj has none.
        return transformers.Qwen2Config(
            **common,
            intermediate_size=96,
            num_hidden_layers=2,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    if arch == "qwen3":
        # Qwen3: per-head q/k RMSNorm (built in), explicit head_dim, linear RoPE scaling.
        return transformers.Qwen3Config(
            **common,
            intermediate_size=96,
            num_hidden_layers=2,
            tie_word_embeddings=False,
            attention_bias=False,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
        )
    if arch == "gpt_oss":
        # YaRN RoPE and rope_theta are left at the config's defaults (gpt-oss's own).
        common = dict(common)
        common["max_position_embeddings"] = 131072  # = 4096 * 32, gpt-oss's own
        return transformers.GptOssConfig(
            **common,
            intermediate_size=32,  # multiple of 32 (MXFP4 blocks run along it for down_proj)
            num_hidden_layers=4,
            layer_types=["sliding_attention", "full_attention"] * 2,
            sliding_window=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
            attention_bias=True,
        )
    raise ValueError(arch)


# ---------------------------------------------------------------------- random init


def reinit_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Re-draw every parameter: nothing zero, nothing exactly one, logits not degenerate."""

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head appears once (as embed)
            leaf = name.split(".")[-1]
            if "norm" in name and leaf == "weight":  # RMSNorm scales (incl. q_norm/k_norm)
                new = normal(p.shape, 0.1, mean=1.0)
            elif name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
                new = normal(p.shape, 0.25)
            elif name.endswith("self_attn.sinks"):
                new = normal(p.shape, 1.0)  # clearly non-zero sinks
            elif ".router." in name:
                new = normal(p.shape, 0.5 if leaf == "weight" else 0.2)  # decisive top-k
            elif leaf.endswith("bias"):
                new = normal(p.shape, 0.1)
            else:  # projection matrices, experts
                new = normal(p.shape, 0.1)
            p.copy_(new)
    for name, p in model.named_parameters():
        assert torch.all(p != 0), f"{name} has zeros"


# --------------------------------------------------------------------------- MXFP4


def mxfp4_quantize(w_out_in: np.ndarray):
    """Quantize [..., out, in] (blocks of 32 along `in`) to MXFP4.

    Returns (codes uint8 [..., out, in/32, 32], scale_bytes uint8 [..., out, in/32],
    dequantized float32 [..., out, in]).  Shared exponent e = floor(log2(absmax)) - 2;
    elements x / 2**e rounded to nearest on the E2M1 grid, ties to the even code,
    saturating at 6.
    """
    x = np.asarray(w_out_in, dtype=np.float64)
    *lead, n_in = x.shape
    assert n_in % MX_BLOCK == 0, x.shape
    xb = x.reshape(*lead, n_in // MX_BLOCK, MX_BLOCK)
    absmax = np.abs(xb).max(axis=-1)
    assert np.all(absmax > 0)
    _, ex = np.frexp(absmax)  # absmax = m * 2**ex, m in [0.5, 1) -> floor(log2) = ex - 1
    e = (ex - 1 - 2).astype(np.int64)
    assert np.all((e + 127 >= 1) & (e + 127 <= 254)), "scale exponent out of E8M0 range"
    scaled = np.abs(xb) / np.ldexp(1.0, e)[..., None]  # exact (power-of-two scaling)
    scaled = np.minimum(scaled, 6.0)
    dist = np.abs(scaled[..., None] - E2M1_GRID)  # [..., 32, 8]
    dmin = dist.min(axis=-1, keepdims=True)
    cand = dist == dmin
    even = (np.arange(8) % 2 == 0)
    tie = cand.sum(axis=-1) > 1
    idx = np.where(tie, np.argmax(cand & even, axis=-1), np.argmax(cand, axis=-1))
    sign = (xb < 0).astype(np.int64)
    codes = (idx | (sign << 3)).astype(np.uint8)
    deq = np.where(sign == 1, -1.0, 1.0) * E2M1_GRID[idx] * np.ldexp(1.0, e)[..., None]
    deq = deq.reshape(*lead, n_in).astype(np.float32)
    return codes, (e + 127).astype(np.uint8), deq


def mxfp4_pack(codes: np.ndarray) -> np.ndarray:
    """[..., 32] codes -> [..., 16] bytes; element 2i in the low nibble, 2i+1 in the high."""
    lo = codes[..., 0::2].astype(np.uint8)
    hi = codes[..., 1::2].astype(np.uint8)
    return (lo | (hi << 4)).astype(np.uint8)


def mxfp4_unpack_dequant(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of the packing, independent of mxfp4_quantize: [..., G, 16] -> [..., G*32]."""
    lut = np.concatenate([E2M1_GRID, -E2M1_GRID])
    vals = np.empty(blocks.shape[:-1] + (MX_BLOCK,), dtype=np.float64)
    vals[..., 0::2] = lut[blocks & 0x0F]
    vals[..., 1::2] = lut[blocks >> 4]
    vals = vals * np.ldexp(1.0, scales.astype(np.int64) - 127)[..., None]
    return vals.reshape(*blocks.shape[:-2], -1).astype(np.float32)


def round_gpt_oss_experts_(model) -> dict[str, np.ndarray]:
    """Round every expert matrix to MXFP4-representable values in place.

    Returns the packed checkpoint tensors: for each layer N and proj in (gate_up, down)
    ``model.layers.N.mlp.experts.{proj}_proj_blocks`` / ``_scales``.  The HF tensor is
    [E, in, out]; the packed form is its transpose [E, out, in] blocked along `in`.
    """
    packed = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            experts = layer.mlp.experts
            for proj in ("gate_up_proj", "down_proj"):
                p = getattr(experts, proj)  # [E, in, out]
                w_out_in = p.detach().numpy().transpose(0, 2, 1)
                codes, scales, deq = mxfp4_quantize(w_out_in)
                blocks = mxfp4_pack(codes)
                back = mxfp4_unpack_dequant(blocks, scales)
                assert np.array_equal(back, deq)
                p.copy_(torch.from_numpy(np.ascontiguousarray(deq.transpose(0, 2, 1))))
                prefix = f"model.layers.{i}.mlp.experts.{proj}"
                packed[f"{prefix}_blocks"] = blocks
                packed[f"{prefix}_scales"] = scales
    return packed


# --------------------------------------------------------------------------- build


def router_margins(model, input_ids) -> float:
    """Smallest gap between the k-th and (k+1)-th router logit over all tokens/layers."""
    gaps = []

    def hook(mod, inp, out):
        logits = out[0]
        top = torch.topk(logits, mod.top_k + 1, dim=-1).values
        gaps.append((top[:, -2] - top[:, -1]).min().item())

    hs = [layer.mlp.router.register_forward_hook(hook) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    for h in hs:
        h.remove()
    return min(gaps)


def forward_logits(model, input_ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=False)
    return out.logits.to(torch.float32).numpy()


def write_golden(path: Path, input_ids: torch.Tensor, logits: np.ndarray) -> None:
    np.savez(path / "golden.npz", input_ids=input_ids.numpy().astype(np.int32),
             logits=logits.astype(np.float32))


def build(arch: str, out_root: Path, seed: int) -> tuple:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    config = make_config(arch)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    reinit_(model, gen)
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ_LEN), generator=gen, dtype=torch.int64)

    packed = None
    if arch == "gpt_oss":
        packed = round_gpt_oss_experts_(model)
        margin = router_margins(model, input_ids)
        if margin < 1e-3:
            raise SystemExit(f"router top-k margin too small ({margin}); change SEED")
        print(f"  gpt_oss router min top-k margin: {margin:.4f}")

    logits = forward_logits(model, input_ids)
    assert np.isfinite(logits).all()
    print(f"  logits std {logits.std():.3f}, mean max-prob "
          f"{torch.softmax(torch.from_numpy(logits), -1).max(-1).values.mean():.3f}")

    d = out_root / arch
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    model.save_pretrained(d, safe_serialization=True)
    for extra in d.iterdir():  # keep only config.json + model.safetensors
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()
    write_golden(d, input_ids, logits)

    # Reload the saved directory through transformers and check it reproduces the logits.
    re = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    np.testing.assert_array_equal(forward_logits(re, input_ids), logits)
    return model, input_ids, logits, packed


def write_gpt_oss_mxfp4(out_root: Path, packed: dict, hf_check: bool) -> None:
    src = out_root / "gpt_oss"
    dst = out_root / "gpt_oss_mxfp4"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    tensors = load_file(src / "model.safetensors")
    n_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    for i in range(n_layers):
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{i}.mlp.experts.{proj}"
            dense = tensors.pop(name).numpy()  # [E, in, out]
            blocks = packed[f"{name}_blocks"]
            scales = packed[f"{name}_scales"]
            back = mxfp4_unpack_dequant(blocks, scales).transpose(0, 2, 1)
            assert np.array_equal(back, dense), name
            tensors[f"{name}_blocks"] = torch.from_numpy(np.ascontiguousarray(blocks))
            tensors[f"{name}_scales"] = torch.from_numpy(np.ascontiguousarray(scales))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    shutil.copyfile(src / "config.json", dst / "config.json")
    shutil.copyfile(src / "golden.npz", dst / "golden.npz")

    # Independent check with transformers' own MXFP4 unpacking (the real gpt-oss path).
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    for i in range(n_layers):
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{i}.mlp.experts.{proj}"
            hf = convert_moe_packed_tensors(tensors[f"{name}_blocks"], tensors[f"{name}_scales"],
                                            dtype=torch.float32)
            ref = load_file(src / "model.safetensors")[name]
            assert torch.equal(hf, ref), name
    print("  gpt_oss_mxfp4: transformers' convert_moe_packed_tensors reproduces gpt_oss weights")

    if hf_check:
        # Load the packed directory as a real (quantized) gpt-oss checkpoint, dequantized,
        # in a temporary copy whose config carries the quantization_config real ones have.
        golden = np.load(dst / "golden.npz")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            shutil.copyfile(dst / "model.safetensors", tmp / "model.safetensors")
            cfg = json.loads((dst / "config.json").read_text())
            cfg["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
            }
            (tmp / "config.json").write_text(json.dumps(cfg))
            model = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float32, attn_implementation="eager",
                quantization_config=transformers.Mxfp4Config(dequantize=True),
            ).eval()
            logits = forward_logits(model, torch.from_numpy(golden["input_ids"]).long())
            np.testing.assert_array_equal(logits, golden["logits"])
        print("  gpt_oss_mxfp4: transformers' Mxfp4Config(dequantize=True) load reproduces golden")


def main(argv=None) -> int:
    repo = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=repo / "tests" / "fixtures")
    ap.add_argument("--skip-hf-mxfp4-check", action="store_true")
    args = ap.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    packed = None
    for k, arch in enumerate(("llama", "qwen2", "qwen3", "gpt_oss")):
        print(f"{arch}:")
        _, _, _, p = build(arch, args.out, SEED + k)
        if p is not None:
            packed = p
    print("gpt_oss_mxfp4:")
    write_gpt_oss_mxfp4(args.out, packed, hf_check=not args.skip_hf_mxfp4_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
