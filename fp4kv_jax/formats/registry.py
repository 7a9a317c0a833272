"""The table of cache formats by name."""

from __future__ import annotations

from fp4kv_jax.formats.base import Codec

_CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    if codec.name in _CODECS:
        raise ValueError(f"cache format {codec.name!r} is registered twice")
    _CODECS[codec.name] = codec
    return codec


def format_names() -> tuple[str, ...]:
    """Every registered format name, widest first (by bits per element at D=128)."""
    return tuple(sorted(_CODECS, key=lambda name: -_CODECS[name].bits_per_element(128)))


def get_codec(fmt: str, arg: str = "fmt") -> Codec:
    """The codec for `fmt`; a ValueError naming `arg` and the valid names otherwise."""
    try:
        return _CODECS[fmt]
    except (KeyError, TypeError):
        raise ValueError(
            f"{arg}: unknown cache format {fmt!r}; valid formats are "
            f"{', '.join(format_names())}."
        ) from None
