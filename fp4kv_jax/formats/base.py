"""The codec interface that every cache format implements, and the tensor it produces.

A codec turns float32 values into stored arrays along the last axis (head_dim for a KV
cache) and back. Everything here is pure jnp, so codecs run under jit, vmap and inside
the cache update.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """Values of logical shape [..., D] stored in one cache format.

    Attributes:
      data: the stored elements. For FP4 formats uint8 [..., D // 2], two E2M1 codes a
        byte with the even element in the low nibble; otherwise [..., D] in the storage
        dtype.
      scales: block scales [..., D // block_size] (uint8 exponents or float8_e4m3fn), or
        None for formats without block scales.
      global_scale: float32 [] tensor-wide scale (fp8, nvfp4), or None.
      fmt: the format name (static).
    """

    data: jax.Array
    scales: jax.Array | None
    global_scale: jax.Array | None
    fmt: str = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape [..., D]."""
        return (*self.data.shape[:-1], self.data.shape[-1] * self.codec.elements_per_datum)

    @property
    def codec(self) -> Codec:
        from fp4kv_jax.formats.registry import get_codec

        return get_codec(self.fmt)

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in jax.tree.leaves(self))


class Codec(abc.ABC):
    """One cache format: how a float32 vector is stored and read back.

    Subclasses set the class attributes and implement `encode` and `decode`. Each
    format lives in its own module of `fp4kv_jax.formats` and registers an instance with
    `register`; nothing else in the library names a format.
    """

    name: ClassVar[str]
    data_dtype: ClassVar[jnp.dtype]
    # Logical elements per stored datum: 2 for packed E2M1, 1 otherwise.
    elements_per_datum: ClassVar[int] = 1
    # Elements per block scale along the last axis; None for no block scales.
    block_size: ClassVar[int | None] = None
    scale_dtype: ClassVar[jnp.dtype | None] = None
    # Whether the format carries a float32 tensor-wide scale.
    has_global_scale: ClassVar[bool] = False
    # decode_planes returns values times 2**plane_exponent (see there).
    plane_exponent: ClassVar[int] = 0
    # Packed FP4 codecs: inline PTX turning one block-scale byte ($1, zero-extended
    # to 32 bits) into the bf16x2 pair ($0) that multiplies decoded E2M1 codes: the
    # block scale times 2**-plane_exponent, as in decode_planes. Used by the Mosaic
    # GPU kernels, which decode tiles in shared memory themselves.
    plane_scale_ptx: ClassVar[str | None] = None
    # The same for two bytes at once: $0 = (scale of byte 0 of $1, scale of byte 0 of
    # $2) as one bf16x2 pair; bits 24-31 of $1 and $2 must be zero (a zero-extended
    # byte or half). Exact like plane_scale_ptx, except where a cheaper mapping gives
    # the same products with E2M1 codes: it may map the non-finite byte to inf (its
    # codes are 0, and 0 * inf is NaN) and need not flush byte 0 to zero.
    plane_scale_pair_ptx: ClassVar[str | None] = None
    # One-byte float codecs: inline PTX turning the four stored codes of $2 (code i in
    # byte i) into two f16x2 pairs, $0 = codes 0 and 1 and $1 = codes 2 and 3 (the
    # lower code in the low half), each the stored value exactly, before the global
    # scale. Used by the warp decode kernel, whose mma then takes f16 operands.
    word_f16_pairs_ptx: ClassVar[str | None] = None

    @abc.abstractmethod
    def encode(
        self, x: jax.Array, global_scale: jax.Array | None
    ) -> tuple[jax.Array, jax.Array | None]:
        """float32 [..., D] -> (data, scales) as described on `QuantizedTensor`."""

    @abc.abstractmethod
    def decode(
        self, data: jax.Array, scales: jax.Array | None, global_scale: jax.Array | None
    ) -> jax.Array:
        """(data, scales) -> float32 [..., D]."""

    def encode_planes(
        self, planes: tuple[jax.Array, ...], global_scale: jax.Array | None, *, ptx: bool
    ) -> tuple[jax.Array, jax.Array | None]:
        """Encodes float32 planes inside a Pallas kernel (Triton lowering) or out of one.

        `planes` are the `elements_per_datum` (P) planes of a tile x [rows, D], as
        `decode_planes` returns them: plane i [rows, D / P] holds columns i, i + P,
        i + 2P, ... A kernel loads the planes apart, so packing two values into a byte
        is elementwise rather than a change of register layout.

        Returns (data [rows, D / P], scales [rows, D / block_size] or None), equal to
        `encode(x)` bit for bit. The default, for one plane, is `encode` itself, which
        suits codecs built only from ops Pallas lowers to Triton and with no float
        division: Triton's float32 `/` is the approximate div.full.f32. Codecs that
        divide override this and divide with `e2m1.divide(..., ptx=ptx)` (or
        `e2m1.divide_by_scalar` for one divisor a tensor): `ptx=True`
        compiled for an NVIDIA GPU, `ptx=False` in interpret mode and in XLA.
        """
        (x,) = planes
        return self.encode(x, global_scale)

    def decode_planes(
        self, data: jax.Array, scales: jax.Array | None, *, ptx: bool
    ) -> tuple[jax.Array, ...]:
        """Decodes a tile [rows, ...] inside a kernel, one plane per element of a datum.

        Plane i holds the logical columns i, i + P, i + 2P, ... (P = elements_per_datum),
        so packed formats need no in-register interleave: a kernel splits its queries
        the same way and sums the per-plane dot products. The planes are the stored
        values divided by the tensor's global scale (if any) and times
        2**plane_exponent; the kernel folds both into its queries or outputs instead
        of touching every element. Each value is exact in bf16, so kernels may cast
        planes to bf16 losslessly.

        With `ptx=True` (compiled for an NVIDIA GPU) a codec may use inline PTX; the
        result must equal the `ptx=False` path, which uses only ops Pallas lowers to
        Triton and runs in interpret mode.
        """
        return (data,)

    def global_scale_for(self, x: jax.Array) -> jax.Array | None:
        """The global scale to use for `x` when the caller gives none."""
        return jnp.float32(1.0) if self.has_global_scale else None

    def initial_global_scale(self) -> jax.Array | None:
        """The global scale a fresh cache starts with (before any calibration)."""
        return jnp.float32(1.0) if self.has_global_scale else None

    @property
    def last_dim_multiple(self) -> int:
        """The last axis must be a multiple of this."""
        return max(self.block_size or 1, self.elements_per_datum)

    def check_last_dim(self, size: int, arg: str = "x") -> None:
        m = self.last_dim_multiple
        if size % m:
            raise ValueError(
                f"{arg}: format {self.name!r} needs the last axis (head_dim) to be a "
                f"multiple of {m}; got {size}."
            )

    def bytes_per_vector(self, size: int) -> int:
        """Bytes stored for one vector of `size` elements: data plus block scales."""
        self.check_last_dim(size, "head_dim")
        data = size // self.elements_per_datum * jnp.dtype(self.data_dtype).itemsize
        scales = 0
        if self.block_size is not None:
            scales = size // self.block_size * jnp.dtype(self.scale_dtype).itemsize
        return data + scales

    def bits_per_element(self, size: int = 128) -> float:
        return 8 * self.bytes_per_vector(size) / size
