"""MLIR and inline-PTX building blocks for one thread's view of the warp decode
kernel (`pallas_mosaic_warp`): global and shared memory access, warp votes and
shuffles, mma.sync, and the float conversions around it."""

from __future__ import annotations

import jax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm, scf
from jax.experimental.mosaic.gpu import utils as mgpu_utils


class Emitter:
    """MLIR and inline-PTX building blocks for one thread's view of the kernel."""

    def __init__(self):
        self.i32 = ir.IntegerType.get_signless(32)
        self.i64 = ir.IntegerType.get_signless(64)
        self.f32 = ir.F32Type.get()

    def int(self, value):
        return arith.constant(self.i32, value)

    def float(self, value):
        return arith.constant(self.f32, value)

    def wide(self, value):
        return arith.extui(self.i64, value)

    def address(self, ref, byte_offset_i64=None):
        base = llvm.ptrtoint(self.i64, mgpu_utils.memref_ptr(ref))
        return base if byte_offset_i64 is None else arith.addi(base, byte_offset_i64)

    def at(self, base_i64, byte_offset_i32):
        return arith.addi(base_i64, self.wide(byte_offset_i32))

    def load(self, address, nbytes, offset=0):
        """Read-only global load of 1, 2, 4, 8 or a multiple of 16 bytes at address +
        offset (a constant) -> i32 words (a byte or a half zero-extended)."""
        if nbytes > 16:
            return [w for part in range(0, nbytes, 16) for w in self.load(address, 16, offset + part)]
        at = f"[${{n}}+{offset}]"
        if nbytes < 4:
            ptx = f"ld.global.nc.u{8 * nbytes} $0, {at.format(n=1)};"
            return [mgpu_utils.inline_ptx(ptx, address, result_types=self.i32)]
        words = nbytes // 4
        if words == 1:
            ptx = f"ld.global.nc.b32 $0, {at.format(n=1)};"
            return [mgpu_utils.inline_ptx(ptx, address, result_types=self.i32)]
        outs = ", ".join(f"${i}" for i in range(words))
        ptx = f"ld.global.nc.v{words}.b32 {{{outs}}}, {at.format(n=words)};"
        return list(mgpu_utils.inline_ptx(ptx, address, result_types=[self.i32] * words))

    def store(self, address, values, *, space="global", predicate=None):
        """Store of 1, 2 or 4 float32 values or i32 words to global or shared memory."""
        kind = "f32" if values[0].type == self.f32 else "b32"
        if len(values) == 1:
            ptx = f"st.{space}.{kind} [$0], $1;"
        else:
            operands = ", ".join(f"${i + 1}" for i in range(len(values)))
            ptx = f"st.{space}.v{len(values)}.{kind} [$0], {{{operands}}};"
        mgpu_utils.inline_ptx(ptx, address, *values, predicate=predicate, has_side_effects=True)

    def any_lane(self, flag):
        """Whether flag (i1) holds in any lane of the warp: i1, the same in every lane."""
        ptx = "{\n.reg .pred p, q;\nsetp.ne.u32 p, $1, 0;\nvote.sync.any.pred q, p, 0xffffffff;\nselp.u32 $0, 1, 0, q;\n}"
        word = mgpu_utils.inline_ptx(ptx, arith.extui(self.i32, flag), result_types=self.i32, convergent=True)
        return arith.cmpi(arith.CmpIPredicate.ne, word, self.int(0))

    def barrier(self):
        """All the program's threads meet (and see each other's shared-memory stores)."""
        mgpu_utils.inline_ptx("bar.sync 0;", has_side_effects=True, convergent=True)

    def update_if(self, condition, update, values):
        """scf.if: update(), a nested list shaped like values, where condition (i1,
        warp-uniform) holds; values unchanged elsewhere."""
        leaves, tree = jax.tree.flatten(values)
        op = scf.IfOp(condition, [v.type for v in leaves], has_else=True)
        with ir.InsertionPoint(op.then_block):
            scf.yield_(jax.tree.leaves(update()))
        with ir.InsertionPoint(op.else_block):
            scf.yield_(leaves)
        return jax.tree.unflatten(tree, list(op.results))

    def shared_address(self, ref):
        return llvm.ptrtoint(self.i32, mgpu_utils.memref_ptr(ref))

    def load_shared(self, address, count):
        """1 or 4 float32 values at a shared-memory address. Kept in order with the
        barrier that makes the stores visible, as every shared access here is."""
        if count == 1:
            return [
                mgpu_utils.inline_ptx("ld.shared.f32 $0, [$1];", address, result_types=self.f32, has_side_effects=True)
            ]
        return list(
            mgpu_utils.inline_ptx(
                "ld.shared.v4.f32 {$0, $1, $2, $3}, [$4];", address, result_types=[self.f32] * 4, has_side_effects=True
            )
        )

    def scaled_pair(self, pair, factor, dtype):
        """A bf16 pair times a float32 factor, rounded to a pair of `dtype` ("bf16" or
        "f16")."""
        ptx = (
            "{\n.reg .b32 lo, hi;\n.reg .f32 a, b;\nshl.b32 lo, $1, 16;\nand.b32 hi, $1, 0xFFFF0000;\n"
            f"mov.b32 a, lo;\nmov.b32 b, hi;\nmul.f32 a, a, $2;\nmul.f32 b, b, $2;\ncvt.rn.{dtype}x2.f32 $0, b, a;\n}}"
        )
        return mgpu_utils.inline_ptx(ptx, pair, factor, result_types=self.i32)

    def mma(self, a, b, c, dtype):
        """D = A B + C of mma.sync m16n8k16 with `dtype` ("bf16" or "f16") operands and
        float32 accumulators: a 4, b 2 and c 4 registers of a lane."""
        ptx = (
            f"mma.sync.aligned.m16n8k16.row.col.f32.{dtype}.{dtype}.f32 "
            "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};"
        )
        return list(mgpu_utils.inline_ptx(ptx, *a, *b, *c, result_types=[self.f32] * 4, convergent=True))

    def transpose8x8(self, x):
        return mgpu_utils.inline_ptx(
            "movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", x, result_types=self.i32, convergent=True
        )

    def exp2(self, x):
        return mgpu_utils.inline_ptx("ex2.approx.ftz.f32 $0, $1;", x, result_types=self.f32)

    def pair(self, low, high, dtype):
        """Two float32 values rounded to a pair of `dtype` ("bf16" or "f16"), low first."""
        return mgpu_utils.inline_ptx(f"cvt.rn.{dtype}x2.f32 $0, $1, $2;", high, low, result_types=self.i32)

    def permute(self, a, b, selector):
        return mgpu_utils.inline_ptx(f"prmt.b32 $0, $1, $2, {selector:#06x};", a, b, result_types=self.i32)

    def max(self, values):
        out = values[0]
        for v in values[1:]:
            out = arith.maximumf(out, v)
        return out

    def sum(self, values):
        out = values[0]
        for v in values[1:]:
            out = arith.addf(out, v)
        return out
