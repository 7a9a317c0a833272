"""Model configurations: one dataclass, built-in ids, and HF `config.json` parsing.

`get_config(name_or_path)` takes a built-in id (see `builtin_config_names()`), an HF
model directory holding `config.json`, or the path of a `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3_moe", "gpt_oss")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer, in HF's terms.

    Attributes not used by an architecture keep their defaults. `layer_types` has one
    entry per layer, FULL_ATTENTION or SLIDING_ATTENTION; sliding layers attend to the
    last `sliding_window` positions.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture: unknown {self.architecture!r}; valid: {', '.join(ARCHITECTURES)}."
            )
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL_ATTENTION,) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types: has {len(self.layer_types)} entries for {self.num_layers} layers."
            )
        for t in self.layer_types:
            if t not in (FULL_ATTENTION, SLIDING_ATTENTION):
                raise ValueError(
                    f"layer_types: unknown {t!r}; valid: {FULL_ATTENTION}, {SLIDING_ATTENTION}."
                )
        if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_window: sliding layers need a positive sliding_window.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}."
            )

    def __hash__(self) -> int:
        # rope_scaling is a dict; hash a canonical text so configs can be static in jit.
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    def layer_window(self, layer: int) -> int | None:
        """The attention window of `layer` in positions, or None for full attention."""
        return self.sliding_window if self.layer_types[layer] == SLIDING_ATTENTION else None


def _gpt_oss(num_layers: int, num_experts: int) -> ModelConfig:
    return ModelConfig(
        architecture="gpt_oss",
        vocab_size=201088,
        hidden_size=2880,
        intermediate_size=2880,
        num_layers=num_layers,
        num_heads=64,
        num_kv_heads=8,
        head_dim=64,
        rope_theta=150000.0,
        rope_scaling=dict(
            rope_type="yarn",
            factor=32.0,
            original_max_position_embeddings=4096,
            beta_fast=32.0,
            beta_slow=1.0,
        ),
        rms_norm_eps=1e-5,
        attention_bias=True,
        max_position_embeddings=131072,
        layer_types=(SLIDING_ATTENTION, FULL_ATTENTION) * (num_layers // 2),
        sliding_window=128,
        num_experts=num_experts,
        experts_per_token=4,
        moe_intermediate_size=2880,
    )


_BUILTIN: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        architecture="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        eos_token_ids=(2,),
    ),
    "qwen3-8b": ModelConfig(
        architecture="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1000000.0,
        qk_norm=True,
        max_position_embeddings=40960,
    ),
    "qwen3-235b-a22b": ModelConfig(
        architecture="qwen3_moe",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=94,
        num_heads=64,
        num_kv_heads=4,
        head_dim=128,
        rope_theta=1000000.0,
        qk_norm=True,
        max_position_embeddings=40960,
        num_experts=128,
        experts_per_token=8,
        moe_intermediate_size=1536,
    ),
    "gpt-oss-20b": _gpt_oss(num_layers=24, num_experts=32),
    "gpt-oss-120b": _gpt_oss(num_layers=36, num_experts=128),
}


def builtin_config_names() -> tuple[str, ...]:
    return tuple(_BUILTIN)


def get_config(name_or_path: str | Path | ModelConfig, arg: str = "model") -> ModelConfig:
    """A ModelConfig from a built-in id, an HF directory, or a `config.json` path."""
    if isinstance(name_or_path, ModelConfig):
        return name_or_path
    key = str(name_or_path)
    if key.lower() in _BUILTIN:
        return _BUILTIN[key.lower()]
    path = Path(key)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return config_from_hf(json.loads(path.read_text()), source=str(path))
    raise ValueError(
        f"{arg}: {key!r} is neither a built-in model ({', '.join(_BUILTIN)}) nor a "
        "directory or file holding an HF config.json."
    )


_MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "gpt_oss": "gpt_oss",
}


def _rope(cfg: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling) from either transformers 5's `rope_parameters` or the
    older `rope_theta` plus `rope_scaling`."""
    params = cfg.get("rope_parameters")
    if params is not None:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    else:
        scaling = dict(cfg.get("rope_scaling") or {})
        theta = cfg.get("rope_theta", 10000.0)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "yarn", "llama3"):
        raise ValueError(
            f"{source}: rope type {kind!r} is not supported; valid: default, linear, yarn, llama3."
        )
    if kind == "default":
        return float(theta), None
    scaling["rope_type"] = kind
    scaling.pop("type", None)
    return float(theta), scaling


def _token_ids(value) -> tuple[int, ...]:
    """An HF `eos_token_id` (None, an int, or a list) as a tuple of ints."""
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


def config_from_hf(cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Parses an HF transformers config dict; unknown model types are refused."""
    model_type = cfg.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported; valid: "
            f"{', '.join(_MODEL_TYPES)}."
        )
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key not in cfg:
            raise ValueError(f"{source}: missing key {key!r}.")
    num_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
    theta, scaling = _rope(cfg, source)
    num_layers = cfg["num_hidden_layers"]
    layer_types = tuple(cfg.get("layer_types") or ())
    sliding_window = cfg.get("sliding_window")
    if model_type != "gpt_oss" and not cfg.get("use_sliding_window", False):
        # Qwen configs carry a sliding_window value that is off unless use_sliding_window.
        layer_types, sliding_window = (), None
    architecture = _MODEL_TYPES[model_type]
    for key, supported in (("swiglu_alpha", 1.702), ("swiglu_limit", 7.0)):
        if key in cfg and cfg[key] != supported:
            raise ValueError(f"{source}: {key}={cfg[key]} is not supported; the model uses {supported}.")
    return ModelConfig(
        architecture=architecture,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg.get("intermediate_size", 0),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads", num_heads),
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("attention_bias", architecture == "qwen2"),
        qk_norm=architecture in ("qwen3", "qwen3_moe"),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        layer_types=layer_types,
        sliding_window=sliding_window,
        num_experts=cfg.get("num_local_experts", cfg.get("num_experts", 0)),
        experts_per_token=cfg.get("num_experts_per_tok", cfg.get("experts_per_token", 0)),
        eos_token_ids=_token_ids(cfg.get("eos_token_id")),
        moe_intermediate_size=cfg.get(
            "moe_intermediate_size", cfg.get("intermediate_size", 0) if model_type == "gpt_oss" else 0
        ),
    )
