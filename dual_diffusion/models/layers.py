"""Small layers shared by the networks: Linear with logical axis names, RMSNorm, norms, buffers.

Parameters are created in `param_dtype` (float32) and cast to the compute
`dtype` on use, so bf16 training keeps fp32 master weights with one code path.
On a sharded mesh a kernel is cast on its shard and then gathered where it is
used (sharding.read_weight, through `matmul`), so FSDP's gathers move the compute dtype and the
gradients are reduced in float32.
Normalisations compute in float32 whatever the compute dtype.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dual_diffusion.sharding import read_weight, weight_placement

Axes = Sequence[str | None]
Initializer = Callable[..., jax.Array]

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def matmul(xs: Sequence[jax.Array], w: jax.Array, axes: Axes, dtype, out_dtype, shape=None) -> tuple[jax.Array, ...]:
    """Each x (..., in) of `xs` @ the weight `w` read as an (in, out) kernel -> (..., out) in `out_dtype`.

    On a mesh the kernel is cast to `dtype` on its shard and gathered once for all of `xs`
    (sharding.read_weight), and reshaped to `shape` (None: w's own shape). Its gradient is accumulated
    by a float32 matmul and reduce-scattered to w's shard in w's dtype (float32 for trainable weights):
    no narrowing cast before the reduction that XLA could move ahead of it. Outputs are named
    "matmul" so the remat policies can save them (they do not see into a custom_vjp).
    """
    placement = weight_placement(w.shape, axes)
    ys = _matmul(tuple(x.astype(dtype) for x in xs), w, placement, jnp.dtype(dtype), jnp.dtype(out_dtype),
                 None if shape is None else tuple(shape), (tuple(w.shape), jnp.dtype(w.dtype)))
    return tuple(checkpoint_name(y, "matmul") for y in ys)


def _kernel(w, placement, dtype, shape):
    k = read_weight(w, placement, dtype)
    return k if shape is None else k.reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _matmul(xs, w, placement, dtype, out_dtype, shape, w_meta):
    return _matmul_fwd(xs, w, placement, dtype, out_dtype, shape, w_meta)[0]


def _matmul_fwd(xs, w, placement, dtype, out_dtype, shape, w_meta):
    k = _kernel(w, placement, dtype, shape)
    return tuple(jnp.dot(x, k, preferred_element_type=out_dtype) for x in xs), (xs, k)


def _matmul_bwd(placement, dtype, out_dtype, shape, w_meta, residuals, gs):
    xs, k = residuals
    dxs = tuple(jax.vjp(lambda x_: jnp.dot(x_, k, preferred_element_type=out_dtype), x)[1](g)[0]
                for x, g in zip(xs, gs))
    dk = sum(jnp.einsum("...i,...o->io", x, g, preferred_element_type=jnp.float32) for x, g in zip(xs, gs))
    w_shape, w_dtype = w_meta
    dk = dk.reshape(w_shape)
    if placement is not None:  # the float32 partial sums reduce-scattered to w's shard
        dk = jax.lax.with_sharding_constraint(dk, placement[0])
    return dxs, dk.astype(w_dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Buffer(nnx.Variable):
    """A non-trainable array that checkpoints carry (e.g. a fixed position grid).

    Not an nnx.Param, so optimizers (filtering on nnx.Param) leave it alone and
    parameter counts exclude it, as PyTorch excludes registered buffers.
    """


class KeyStream:
    """Per-parameter keys folded from one key with a Python counter; duck-types `nnx.Rngs.params()`.

    Why: every `nnx.Rngs` draw updates a counter Variable, and under tracing
    (nnx.eval_shape / jitted sharded init) flax probes the traced counter's
    `.sharding`, whose error message costs a scan of the whole jaxpr: init of
    the 2B model took about a minute. A Python counter avoids it.
    """

    def __init__(self, key: jax.Array):
        self.key, self.count = key, 0

    def params(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


def param(init: Initializer, rngs: nnx.Rngs, shape: Sequence[int], axes: Axes, dtype="float32") -> nnx.Param:
    """An nnx.Param with logical axis names (metadata only; see dual_diffusion/sharding.py)."""
    if len(axes) != len(shape):
        raise ValueError(f"param: logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.dtype(dtype)), out_sharding=tuple(axes))


class Linear(nnx.Module):
    """y = x @ kernel + bias; kernel (in, out) = torch weight transposed.

    axes: logical names of (in, out); the bias takes the out name.
    Output is in `dtype` unless `out_dtype` is given to __call__ (accumulation
    then happens in that dtype, e.g. float32 logits from bf16 inputs).
    """

    def __init__(self, in_features: int, out_features: int, axes: Axes, *, use_bias: bool = True,
                 dtype="float32", param_dtype="float32", kernel_init: Initializer = xavier_uniform,
                 bias_init: Initializer = zeros, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(dtype)
        self.axes = tuple(axes)
        self.kernel = param(kernel_init, rngs, (in_features, out_features), axes, param_dtype)
        self.bias = param(bias_init, rngs, (out_features,), (axes[1],), param_dtype) if use_bias else None

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        return self.each([x], out_dtype)[0]

    def each(self, xs: Sequence[jax.Array], out_dtype=None) -> list[jax.Array]:
        """The layer on each input of `xs`, its kernel read (on a mesh: gathered) once for all of them."""
        out_dtype = self.dtype if out_dtype is None else jnp.dtype(out_dtype)
        ys = list(matmul(xs, self.kernel[...], self.axes, self.dtype, out_dtype))
        if self.bias is not None:
            ys = [y + self.bias[...].astype(out_dtype) for y in ys]
        return ys


class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the last axis, in float32; returns the input dtype."""

    def __init__(self, dim: int, *, eps: float = 1e-6, axes: Axes = ("norm",), param_dtype="float32",
                 rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(ones, rngs, (dim,), axes, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters over the last axis; float32 result."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps)


# Runtime.remat_policy -> what a rematerialised layer saves for the backward pass.
# Under scan_layers the scan keeps each layer's input either way, so "full" saves only the block inputs.
# The weight matmuls are `matmul`'s custom_vjp, whose dot the dot policies cannot see: they save its
# output by name (every dot without batch dimensions in the networks is one of them).
_cp = jax.checkpoint_policies
REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer: recompute it in the backward pass
    "dots": _cp.save_from_both_policies(_cp.checkpoint_dots, _cp.save_only_these_names("matmul")),
    "dots_no_batch": _cp.save_from_both_policies(_cp.checkpoint_dots_with_no_batch_dims,
                                                 _cp.save_only_these_names("matmul")),
    # The same saved matmul outputs, kept in host memory between the passes (TPU/GPU; HBM for PCIe traffic).
    "dots_offload": _cp.save_and_offload_only_these_names(names_which_can_be_saved=[],
                                                          names_which_can_be_offloaded=["matmul"],
                                                          offload_src="device", offload_dst="pinned_host"),
}


def check_remat_policy(policy: str) -> None:
    if policy != "none" and policy not in REMAT_POLICIES:
        raise ValueError(f"Runtime.remat_policy={policy!r}; expected 'none' or one of {sorted(REMAT_POLICIES)}")


def remat(fn: Callable, policy: str) -> Callable:
    """`fn` wrapped in jax.checkpoint with the named policy ("none" returns fn unchanged)."""
    check_remat_policy(policy)
    return fn if policy == "none" else jax.checkpoint(fn, policy=REMAT_POLICIES[policy])


def write_rows(cache_BxLx, window_BxWx, starts_B):
    """cache with each row b's positions starts[b] .. starts[b] + W - 1 replaced by the window's row b."""
    return jax.vmap(lambda c, w, s: jax.lax.dynamic_update_slice_in_dim(c, w.astype(c.dtype), s, axis=0))(
        cache_BxLx, window_BxWx, starts_B)


def read_rows(full_BxLx, starts_B, width: int):
    """(B, width, ...): each row b's positions starts[b] .. starts[b] + width - 1."""
    return jax.vmap(lambda f, s: jax.lax.dynamic_slice_in_dim(f, s, width, axis=0))(full_BxLx, starts_B)
