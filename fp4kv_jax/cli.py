"""The `fp4kv` command line."""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from fp4kv_jax.formats import format_names
from fp4kv_jax.memory import kv_cache_bytes_per_token, max_cache_tokens
from fp4kv_jax.models.configs import builtin_config_names, get_config

_GIB = 1024**3


def memory_table(model: str, budget_gib: float, cache_dtypes: list[str], trim: bool) -> str:
    """A markdown table: bytes per token, tokens that fit, and the ratio to bf16."""
    config = get_config(model, arg="--model")
    budget = int(budget_gib * _GIB)
    baseline = max_cache_tokens(config, "bf16", budget, trim_sliding_layers=trim)
    rows = [
        f"KV cache of {model}: {config.num_layers} layers, {config.num_kv_heads} KV heads, "
        f"head_dim {config.head_dim}; budget {budget_gib:g} GiB, one sequence"
        + (", sliding layers trimmed to their window" if trim else ""),
        "",
        "| cache dtype | bits/element | bytes/token | tokens that fit | vs bf16 |",
        "|---|---:|---:|---:|---:|",
    ]
    for fmt in cache_dtypes:
        per_token = kv_cache_bytes_per_token(config, fmt)
        bits = 8 * per_token / (2 * config.num_layers * config.num_kv_heads * config.head_dim)
        tokens = max_cache_tokens(config, fmt, budget, trim_sliding_layers=trim)
        ratio = tokens / baseline if baseline else float("nan")
        rows.append(f"| {fmt} | {bits:g} | {per_token:,} | {tokens:,} | {ratio:.2f}x |")
    return "\n".join(rows)


def _cache_dtype_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [n for n in names if n not in format_names()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown cache dtype(s) {unknown}; valid: {', '.join(format_names())}"
        )
    return names


def _recipe_name(name: str) -> str:
    """A cache dtype, optionally with recipe suffixes ("nvfp4+hadamard"), or "auto"."""
    from fp4kv_jax.recipes import recipe_from_name

    if name != "auto":
        try:
            recipe_from_name(name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return name


def _recipe_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no cache dtypes given; valid: {', '.join(format_names())}")
    return [_recipe_name(name) for name in names]


def chat_prompt(tokenizer, prompt: str) -> str:
    """`prompt` as one user turn in the model's chat template (from the GGUF)."""
    import jinja2

    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("--chat: the model carries no chat template.")
    messages = [{"role": "user", "content": prompt}]
    return jinja2.Template(template).render(messages=messages, add_generation_prompt=True)


class TokenStreamer:
    """Prints the new text of sequence 0 as tokens arrive, with a progress bar."""

    def __init__(self, tokenizer, max_new_tokens: int):
        from tqdm import tqdm

        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""
        self.bar = tqdm(total=max_new_tokens, unit="tok", leave=False, file=sys.stderr)

    def __call__(self, tokens) -> None:
        token = int(tokens[0])
        self.bar.update(1)
        if token < 0:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.printed):
            print(text[len(self.printed) :], end="", flush=True)
            self.printed = text

    def close(self) -> None:
        self.bar.close()


def run_generate(args) -> int:
    from fp4kv_jax.generate import generate
    from fp4kv_jax.models import from_pretrained
    from fp4kv_jax.recipes import recipe_from_name

    model = from_pretrained(args.model, dtype=jnp.float32 if args.float32 else jnp.bfloat16)
    if model.tokenizer is None:
        raise ValueError(f"--model: {args.model} carries no tokenizer; generate needs one.")
    prompt = chat_prompt(model.tokenizer, args.prompt) if args.chat else args.prompt
    streamer = TokenStreamer(model.tokenizer, args.max_new_tokens)
    cache_dtype, cache_options = args.cache_dtype, {}
    if cache_dtype != "auto":
        recipe = recipe_from_name(cache_dtype)
        query_moments = None
        if recipe.rounds_keys:
            from fp4kv_jax.ablate import calibration_moments, load_corpus

            query_moments = calibration_moments(model, load_corpus(args.calibration, "--calibration")[1])
        cache_dtype, cache_options = recipe.cache_dtype, recipe.cache_options(query_moments)
    try:
        result = generate(
            model, [prompt], max_new_tokens=args.max_new_tokens, cache_dtype=cache_dtype,
            cache_options=cache_options, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            on_token=streamer,
        )
    finally:
        streamer.close()
    print()
    print(
        f"[{result.lengths[0]} tokens; cache {args.cache_dtype}, {result.cache_bytes:,} bytes; "
        f"prefill {result.prefill_seconds:.2f} s; decode {result.decode_tokens_per_second:.1f} "
        "tokens/s (compilation included on a first call)]",
        file=sys.stderr,
    )
    return 0


def run_ablate(args) -> int:
    if args.context < 2:
        raise ValueError(f"--context: a window needs at least 2 tokens, got {args.context}.")
    if args.tokens < args.context:
        raise ValueError(f"--tokens: must be at least --context ({args.context}), got {args.tokens}.")
    if args.prompts < 1:
        raise ValueError(f"--prompts: must be at least 1, got {args.prompts}.")
    if args.budget_gib <= 0:
        raise ValueError(f"--budget-gib: must be positive, got {args.budget_gib:g}.")
    try:
        device = jax.devices(args.device)[0]
    except RuntimeError:
        raise ValueError(f"--device: JAX sees no {args.device} device; valid here: "
                         f"{', '.join(sorted({d.platform for d in jax.devices()} | {'cpu'}))}.") from None
    with jax.default_device(device):
        return _ablate_on_device(args)


def _ablate_on_device(args) -> int:
    from fp4kv_jax import key_rounding
    from fp4kv_jax.ablate import (
        AblationSettings, ablate, default_calibration, load_corpus, markdown_table, write_outputs,
    )
    from fp4kv_jax.recipes import recipe_from_name
    from fp4kv_jax.models import from_pretrained

    corpus_name, texts = load_corpus(args.corpus)
    # float32 parameters, so that the cache is the only thing that differs between rows.
    model = from_pretrained(args.model, dtype=jnp.float32)
    if model.tokenizer is None:
        raise ValueError(f"--model: {args.model} carries no tokenizer; ablate needs one to read the corpus.")
    if args.context > model.config.max_position_embeddings:
        raise ValueError(
            f"--context: {args.context} exceeds the model's max_position_embeddings "
            f"({model.config.max_position_embeddings})."
        )
    placeholder_moments = key_rounding.isotropic_moments(model.config)
    for name in args.cache_dtypes:
        try:  # refuses what the model can't hold
            recipe_from_name(name).build_cache(model, 1, 1, query_moments=placeholder_moments)
        except ValueError as error:
            raise ValueError(f"--cache-dtypes: {name}: {error}") from None
    calibration = None
    if any(recipe_from_name(name).rounds_keys for name in args.cache_dtypes):
        calibration = (
            load_corpus(args.calibration, "--calibration") if args.calibration else default_calibration(args.corpus)
        )
    results = ablate(
        model, args.model, corpus_name, texts, args.cache_dtypes, context=args.context,
        tokens=args.tokens, prompts=args.prompts,
        settings=AblationSettings(budget_gib=args.budget_gib), calibration=calibration,
    )
    paths = write_outputs(results, args.out)
    print(markdown_table(results))
    print(f"[wrote {', '.join(str(p) for p in paths)}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp4kv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    memory = commands.add_parser(
        "memory", help="KV-cache bytes per token and tokens that fit, per cache dtype"
    )
    memory.add_argument(
        "--model",
        default="smollm2-135m",
        help=f"built-in id ({', '.join(builtin_config_names())}) or an HF directory",
    )
    memory.add_argument("--budget-gib", type=float, default=16.0, help="memory budget in GiB")
    memory.add_argument(
        "--cache-dtypes",
        type=_cache_dtype_list,
        default=list(format_names()),
        help="comma-separated cache dtypes (default: all)",
    )
    memory.add_argument(
        "--trim-sliding-layers",
        action="store_true",
        help="sliding-window layers keep only their window",
    )
    gen = commands.add_parser("generate", help="generate text, streaming it, then print tokens/s")
    gen.add_argument("--model", default="smollm2-135m", help="built-in name, HF directory or .gguf")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument(
        "--cache-dtype",
        type=_recipe_name,
        default="bf16",
        help=f"one of {', '.join(format_names())} or auto, optionally with recipe suffixes "
        "such as nvfp4+hadamard (default: bf16)",
    )
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--float32", action="store_true", help="float32 parameters (default bf16)")
    gen.add_argument(
        "--calibration",
        help="a UTF-8 text file whose queries a +round_keys cache dtype calibrates on "
        "(default: the works of Shakespeare)",
    )
    abl = commands.add_parser(
        "ablate",
        help="per cache dtype: perplexity change, KL, agreement with bf16, layer errors, memory",
    )
    abl.add_argument("--model", default="smollm2-135m", help="built-in name, HF directory or .gguf")
    abl.add_argument("--corpus", help="a UTF-8 text file (default: the works of Shakespeare)")
    abl.add_argument(
        "--calibration",
        help="a UTF-8 text file whose queries +round_keys rows calibrate on (default: a built-in text "
        "other than the corpus: the Python docs for Shakespeare, else Shakespeare)",
    )
    abl.add_argument(
        "--cache-dtypes",
        type=_recipe_list,
        default=["bf16", "fp8_e4m3", "fp4_e2m1", "mxfp4", "nvfp4"],
        help="comma-separated cache dtypes, each optionally with recipe suffixes such as "
        "nvfp4+hadamard; bf16, the reference, is always scored "
        "(default: bf16,fp8_e4m3,fp4_e2m1,mxfp4,nvfp4)",
    )
    abl.add_argument("--context", type=int, default=512, help="tokens per scored window")
    abl.add_argument("--tokens", type=int, default=2048, help="scored tokens in all, at most")
    abl.add_argument("--prompts", type=int, default=8, help="prompts for greedy-continuation agreement")
    abl.add_argument("--budget-gib", type=float, default=1.0, help="memory budget in GiB for tokens that fit")
    abl.add_argument("--out", default="ablation_results", help="directory for results.json, results.md, plots")
    abl.add_argument(
        "--device", choices=("cpu", "gpu"), default="cpu",
        help="where to run; on gpu, attention goes through the fused Pallas kernels",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "ablate":
            return run_ablate(args)
        print(memory_table(args.model, args.budget_gib, args.cache_dtypes, args.trim_sliding_layers))
    except ValueError as error:
        print(f"fp4kv {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
