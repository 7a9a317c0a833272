import sys, time, statistics
import jax, jax.numpy as jnp
from jax import lax
from common import realistic_kv, median_ms
from decode_attention import TARGET, stored_layer
from fp4kv_jax.kernels.decode_attention import decode_attention, pallas_mosaic_warp as W, splits
b, s, hq, hkv, d = (TARGET[n] for n in ("batch", "context", "heads", "kv_heads", "head_dim"))
k, v = realistic_kv(jax.random.key(2), b, hkv, s, d)
q = jax.random.normal(jax.random.key(3), (b, hq, d), jnp.bfloat16)
lengths = jnp.full((b,), s, jnp.int32)
k_bthd = k.transpose(0, 2, 1, 3).astype(jnp.bfloat16); v_bthd = v.transpose(0, 2, 1, 3).astype(jnp.bfloat16)
cudnn = lambda q, k, v: jax.nn.dot_product_attention(q[:, None], k, v, implementation="cudnn")[:, 0]
def chain(f, n=20):
    def run(q, *a):
        def body(i, q):
            return q + (f(q, *a) * 0).astype(q.dtype)
        return lax.fori_loop(0, n, body, q)
    return jax.jit(run)
print("cudnn op", median_ms(jax.jit(cudnn), q, k_bthd, v_bthd))
print("cudnn chain/20", median_ms(chain(cudnn), q, k_bthd, v_bthd, repeats=10, calls=1) / 20)
del k_bthd, v_bthd
for fmt in ("fp4_e2m1", "nvfp4"):
    layer = stored_layer(k, v, fmt)
    op = lambda q, layer, lengths: decode_attention(q, layer, lengths, implementation="pallas_mosaic_warp")
    print(fmt, "op", median_ms(jax.jit(op), q, layer, lengths))
    print(fmt, "op chain/20", median_ms(chain(op), q, layer, lengths, repeats=10, calls=1) / 20)
    qf = W.query_fragments(q, layer.k, 1, 0.088)
    print(fmt, "query_fragments", median_ms(jax.jit(lambda q, kk: W.query_fragments(q, kk, 1, 0.088)), q, layer.k))
