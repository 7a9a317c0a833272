"""The `fp4kv` command line."""

from __future__ import annotations

import argparse
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "memory":
        try:
            table = memory_table(
                args.model, args.budget_gib, args.cache_dtypes, args.trim_sliding_layers
            )
        except ValueError as error:
            print(f"fp4kv memory: {error}", file=sys.stderr)
            return 2
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
