"""The T5 v1.1 encoder (REFERENCE.md, Text input): the frozen text encoder of D-DiT.

Same math as transformers' `T5EncoderModel` (last_hidden_state):
  h = embed(ids)
  per layer: h += o(attn(q, k, v of rms(h); bias = relative position bias + mask, no 1/sqrt(d)))
             h += wo(gelu_tanh(wi_0 rms(h)) * wi_1 rms(h))       (or wo(relu(wi rms(h))))
  out = rms(h)
The relative position bias is computed once from one bucket table and shared
by every layer (transformers keeps that table in layer 0; here it sits beside
the layers, so all layers are identical and can be scanned).

Text cache (diffusion/text_sampling.py): `encode_with_kv` also returns every
layer's keys and values, and `encode_window` encodes W positions per row over
them (queries at their true positions against all L keys), the rest unchanged.

Precision: parameters stay in param_dtype and are cast to Runtime.dtype on use;
norms compute in float32, the residual stream is kept in float32 and the
output is float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dual_diffusion.models.attention import attention
from dual_diffusion.models.configs import Runtime, T5Config
from dual_diffusion.models.layers import Linear, RMSNorm, check_remat_policy, remat, write_rows
from dual_diffusion.sharding import constrain

STREAM = ("batch", "seq", None)

def relative_position_buckets(query_len: int, key_len: int, num_buckets: int, max_distance: int,
                              bidirectional: bool = True) -> np.ndarray:
    """(query_len, key_len) int32 bucket of each relative position key - query (static, numpy).

    Half the buckets are exact offsets, the rest grow logarithmically up to
    max_distance, beyond which offsets share the last bucket. The log is taken
    in float32 and truncated toward zero, as transformers does, so buckets agree
    exactly at the bin edges.
    """
    relative = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]
    buckets = np.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0) * num_buckets
        relative = np.abs(relative)
    else:
        relative = -np.minimum(relative, 0)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    with np.errstate(divide="ignore"):
        log_ratio = np.log(relative.astype(np.float32) / np.float32(max_exact))
        large = (log_ratio / np.float32(math.log(max_distance / max_exact))
                 * np.float32(num_buckets - max_exact))
    large = max_exact + np.where(is_small, 0, large).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(is_small, relative, large)).astype(np.int32)


class T5Layer(nnx.Module):
    """One encoder block: pre-norm self-attention and pre-norm feed-forward, both residual."""

    def __init__(self, cfg: T5Config, runtime: Runtime, *, rngs: nnx.Rngs):
        if cfg.feed_forward_proj not in ("gated-gelu", "relu"):
            raise ValueError(f"T5Config.feed_forward_proj={cfg.feed_forward_proj!r}; expected 'gated-gelu' or 'relu'")
        d, inner, ff = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
        self.num_heads, self.head_dim = cfg.num_heads, cfg.d_kv
        self.gated = cfg.feed_forward_proj == "gated-gelu"
        self.attention_impl = runtime.attention_impl
        # transformers' init scales (std); irrelevant for converted weights, sane for random tests.
        normal = nnx.initializers.normal
        lin = dict(use_bias=False, dtype=runtime.dtype, param_dtype=runtime.param_dtype, rngs=rngs)
        norm = dict(eps=cfg.layer_norm_epsilon, param_dtype=runtime.param_dtype, rngs=rngs)
        self.attn_norm = RMSNorm(d, **norm)
        self.q = Linear(d, inner, ("embed", "heads"), kernel_init=normal((d * cfg.d_kv) ** -0.5), **lin)
        self.k = Linear(d, inner, ("embed", "heads"), kernel_init=normal(d ** -0.5), **lin)
        self.v = Linear(d, inner, ("embed", "heads"), kernel_init=normal(d ** -0.5), **lin)
        self.o = Linear(inner, d, ("heads", "embed"), kernel_init=normal(inner ** -0.5), **lin)
        self.ff_norm = RMSNorm(d, **norm)
        if self.gated:
            self.wi_0 = Linear(d, ff, ("embed", "mlp"), kernel_init=normal(d ** -0.5), **lin)
            self.wi_1 = Linear(d, ff, ("embed", "mlp"), kernel_init=normal(d ** -0.5), **lin)
        else:
            self.wi = Linear(d, ff, ("embed", "mlp"), kernel_init=normal(d ** -0.5), **lin)
        self.wo = Linear(ff, d, ("mlp", "embed"), kernel_init=normal(ff ** -0.5), **lin)

    def __call__(self, hs: tuple[jax.Array, ...], biases: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        """Each row set h (float32 residual stream, (B, L, D)) with its bias (position bias + key mask, float32).

        The layer's weights are read once for all sets (on a mesh: gathered once per layer).
        """
        heads = lambda t: constrain(t.reshape(t.shape[:2] + (self.num_heads, self.head_dim)),  # noqa: E731
                                    ("batch", "seq", "heads", None))
        xs = [self.attn_norm(h) for h in hs]
        # T5 folds any 1/sqrt(d) into its weights: unscaled logits (scale=1.0).
        attended = [attention(heads(q), heads(k), heads(v), impl=self.attention_impl, bias=bias, scale=1.0)
                    .reshape(h.shape[:2] + (-1,))
                    for q, k, v, bias, h in zip(self.q.each(xs), self.k.each(xs), self.v.each(xs), biases, hs)]
        hs = [h + o for h, o in zip(hs, self.o.each(attended, out_dtype=jnp.float32))]

        xs = [self.ff_norm(h) for h in hs]
        if self.gated:  # "gelu_new" = tanh approximation
            fs = [jax.nn.gelu(a, approximate=True) * b for a, b in zip(self.wi_0.each(xs), self.wi_1.each(xs))]
        else:
            fs = [jax.nn.relu(a) for a in self.wi.each(xs)]
        fs = [constrain(f, ("batch", "seq", "mlp")) for f in fs]
        # transformers keeps wo in float32 under half precision; we accumulate it in float32.
        return tuple(constrain(h + w, STREAM) for h, w in zip(hs, self.wo.each(fs, out_dtype=jnp.float32)))

    def with_kv(self, h_BxLxD: jax.Array, bias: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The layer on one row set, also returning its attention keys and values (each (B, L, H, Dh))."""
        x = self.attn_norm(h_BxLxD)
        q, k, v = (self._heads(t) for t in (self.q(x), self.k(x), self.v(x)))
        return self._finish(h_BxLxD, q, k, v, bias), (k, v)

    def window(self, h_BxWxD: jax.Array, bias_BxHxWxL: jax.Array, kv, starts_B: jax.Array) -> jax.Array:
        """The layer on W positions per row (row b: starts[b] ..), their queries attending to every key: the
        cached keys and values kv = (k, v) (B, L, H, Dh) with the window's fresh ones written over its positions.
        bias: the position bias of the window's true positions (queries) against all L (keys)."""
        x = self.attn_norm(h_BxWxD)
        q, k, v = (self._heads(t) for t in (self.q(x), self.k(x), self.v(x)))
        return self._finish(h_BxWxD, q, write_rows(kv[0], k, starts_B), write_rows(kv[1], v, starts_B), bias_BxHxWxL)

    def _heads(self, t):
        return constrain(t.reshape(t.shape[:2] + (self.num_heads, self.head_dim)), ("batch", "seq", "heads", None))

    def _finish(self, h, q, k, v, bias):
        """h + attention (unscaled logits: T5 folds 1/sqrt(d) into its weights), then the feed-forward."""
        o = attention(q, k, v, impl=self.attention_impl, bias=bias, scale=1.0).reshape(h.shape[:2] + (-1,))
        h = h + self.o(o, out_dtype=jnp.float32)
        x = self.ff_norm(h)
        f = jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x) if self.gated else jax.nn.relu(self.wi(x))
        return constrain(h + self.wo(constrain(f, ("batch", "seq", "mlp")), out_dtype=jnp.float32), STREAM)


class T5Encoder(nnx.Module):
    """T5 encoder: token ids (B, L) [+ attention mask (B, L), 1 = keep] -> float32 (B, L, d_model)."""

    def __init__(self, cfg: T5Config, runtime: Runtime = Runtime(), *, rngs: nnx.Rngs):
        check_remat_policy(runtime.remat_policy)
        self.cfg, self.runtime = cfg, runtime
        pdt = jnp.dtype(runtime.param_dtype)
        # One table, read by the embedding lookup. Training keeps the mask token's row apart (a (1, d_model)
        # parameter passed as `mask_row_1xD`) and the table frozen.
        self.embedding = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (cfg.vocab_size, cfg.d_model), pdt),
                                   out_sharding=("vocab", "embed"))
        # (buckets, heads); tiny, so replicated.
        self.relative_attention_bias = nnx.Param(
            nnx.initializers.normal(cfg.d_model ** -0.5)(
                rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads), pdt),
            out_sharding=(None, None))
        self.layers = nnx.List([T5Layer(cfg, runtime, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, param_dtype=runtime.param_dtype, rngs=rngs)

    def position_bias(self, length: int) -> jax.Array:
        """(1, H, L, L) float32 relative position bias, shared by all layers."""
        buckets = relative_position_buckets(length, length, self.cfg.relative_attention_num_buckets,
                                            self.cfg.relative_attention_max_distance)
        table = self.relative_attention_bias[...].astype(jnp.float32)
        return jnp.transpose(table[buckets], (2, 0, 1))[None]

    def embed(self, token_ids_BxL: jax.Array, mask_row_1xD: jax.Array | None = None,
              mask_id: int | None = None) -> jax.Array:
        """Float32 (B, L, d_model) input rows; with `mask_row_1xD`, positions holding `mask_id` read that row
        instead of the table's (training keeps T5's one trainable row apart from the frozen table)."""
        rows = jnp.take(self.embedding[...], token_ids_BxL, axis=0)
        if mask_row_1xD is not None:  # broadcast first: each position's gradient is rounded as a table row's is
            row = jnp.broadcast_to(mask_row_1xD.astype(jnp.float32)[None], rows.shape)
            rows = jnp.where((token_ids_BxL == mask_id)[..., None], row, rows)
        # Embedding rows are rounded to the compute dtype (as a bf16 torch model would), then
        # carried in the float32 residual stream.
        h = rows.astype(jnp.dtype(self.runtime.dtype)).astype(jnp.float32)
        return constrain(h, STREAM)

    def bias(self, length: int, attention_mask_BxL: jax.Array | None = None) -> jax.Array:
        """(1 or B, H, L, L) float32: the relative position bias, plus the key mask when given."""
        bias = self.position_bias(length)
        if attention_mask_BxL is not None:
            # Masked keys get the most negative float32, as transformers' additive mask does.
            keep = attention_mask_BxL.astype(bool)[:, None, None, :]
            bias = bias + jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)
        return bias

    def __call__(self, token_ids_BxL: jax.Array, attention_mask_BxL: jax.Array | None = None, *,
                 mask_row_1xD: jax.Array | None = None, mask_id: int | None = None) -> jax.Array:
        h = self.embed(token_ids_BxL, mask_row_1xD, mask_id)
        (h,) = self._run_layers((h,), (self.bias(token_ids_BxL.shape[1], attention_mask_BxL),), (False,))
        return constrain(self.final_norm(h).astype(jnp.float32), STREAM)

    def encode_two(self, frozen_ids_BxL: jax.Array, token_ids_BxL: jax.Array, *, mask_row_1xD=None,
                   mask_id: int | None = None, differentiate_frozen: bool = False) -> tuple[jax.Array, jax.Array]:
        """T5 of two row sets in one pass over the layers: (hidden of frozen_ids, hidden of token_ids).

        Each layer's weights are read (on a sharded mesh: gathered) once for both sets. Unless
        `differentiate_frozen`, the first set runs under stop_gradient: no residuals are saved and no
        backward pass runs for its rows (training's captions, which hold no mask token).
        """
        hs = (self.embed(frozen_ids_BxL, mask_row_1xD, mask_id), self.embed(token_ids_BxL, mask_row_1xD, mask_id))
        stop = (not differentiate_frozen, False)
        hs = tuple(jax.lax.stop_gradient(h) if s else h for h, s in zip(hs, stop))
        bias = self.position_bias(frozen_ids_BxL.shape[1]), self.position_bias(token_ids_BxL.shape[1])
        hs = self._run_layers(hs, bias, stop)
        return tuple(constrain(self.final_norm(h).astype(jnp.float32), STREAM) for h in hs)

    def encode_with_kv(self, token_ids_BxL: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """__call__ (no attention mask) that also returns every layer's attention keys and values, each
        (layers, B, L, H, Dh): the cache `encode_window` reads."""
        h = self.embed(token_ids_BxL)
        bias = self.position_bias(token_ids_BxL.shape[1])
        h, kv = self._fold_layers(lambda layer, h, _: layer.with_kv(h, bias), h)
        return constrain(self.final_norm(h).astype(jnp.float32), STREAM), kv

    def encode_window(self, window_ids_BxW: jax.Array, starts_B: jax.Array, kv) -> jax.Array:
        """Float32 (B, W, d_model): the encoding of the W ids at positions starts[b] .. starts[b] + W - 1 of each
        row, every other position read from the cache `kv` of `encode_with_kv`. With the cache of the same ids,
        equal to the full encoding at those positions: each query attends to all L keys, with the relative
        position bias of its true position."""
        W, L = window_ids_BxW.shape[1], kv[0].shape[2]
        full = self.position_bias(L)[0]  # (H, L, L): query rows, key columns
        bias = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(full, s, W, axis=1))(starts_B)  # (B, H, W, L)
        h, _ = self._fold_layers(lambda layer, h, kv: (layer.window(h, bias, kv, starts_B), None),
                                 self.embed(window_ids_BxW), kv)
        return constrain(self.final_norm(h).astype(jnp.float32), STREAM)

    def _run_layers(self, hs: tuple, biases: tuple, stop: tuple) -> tuple:
        """All layers on each row set of `hs` (stop[i]: set i under stop_gradient)."""
        def one_layer(layer, hs, _):
            out = layer(tuple(constrain(h, STREAM) for h in hs), biases)
            return tuple(jax.lax.stop_gradient(h) if s else h for h, s in zip(out, stop)), None

        return self._fold_layers(one_layer, hs)[0]

    def _fold_layers(self, step, carry, per_layer=None):
        """Folds `step(layer, carry, x_l) -> (carry, y_l)` over the layers, as a Python loop or one lax.scan over
        per-layer states stacked here; per_layer: a pytree whose leading axis is the layer (x_l its l-th
        slice, or None). Returns (carry, the y_l stacked on a leading layer axis, or None).

        The stack is a transient copy of the layer parameters (the price of storing them
        per layer, which keeps checkpoints and key maps independent of scan_layers).
        """
        graphdef, _ = nnx.split(self.layers[0])
        states = [nnx.state(layer) for layer in self.layers]
        fn = remat(lambda state, carry, x: step(nnx.merge(graphdef, state), carry, x), self.runtime.remat_policy)
        if not self.runtime.scan_layers:
            ys = []
            for i, state in enumerate(states):
                carry, y = fn(state, carry, jax.tree.map(lambda a: a[i], per_layer))
                ys.append(y)
            return carry, (None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys))
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        return jax.lax.scan(lambda carry, sx: fn(sx[0], carry, sx[1]), carry, (stacked, per_layer))


def fold_mask_row(table_VxD: jax.Array, mask_row_1xD: jax.Array, mask_id: int) -> jax.Array:
    """The embedding table with row `mask_id` replaced by the trained mask row (in the table's dtype)."""
    return jnp.asarray(table_VxD).at[mask_id].set(jnp.asarray(mask_row_1xD)[0].astype(table_VxD.dtype))
