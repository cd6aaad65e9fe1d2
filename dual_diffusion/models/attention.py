"""The one attention function every network calls.

`attention(q, k, v, impl=...)` picks the kernel from the config and from the
platform of the devices the computation runs on (the active mesh's, see
`sharding.compute_platform`; never the host's, so a step compiled for a TPU
topology from a CPU host contains the TPU kernels):
  xla     plain XLA (any backend, any dtype; the parity reference)
  cudnn   cuDNN flash attention (NVIDIA GPU, bf16/fp16)
  pallas  Pallas splash attention (TPU), under shard_map over the batch and head axes
  auto    cudnn on GPU with bf16/fp16, pallas on TPU, else xla
An implementation that cannot serve a call falls back to xla, with one warning
per reason. Biased attention (T5's relative positions) always uses xla: a
Pallas kernel would need the full (B, H, L, L) float32 bias in memory, as large
as the logits XLA makes, and at T5's 256 tokens those are small. Measured
(T5-XXL, 4 layers, 256 tokens, forward + backward under remat dots_no_batch,
8 rows per chip on v5p-16, 2026-12-01): peak 6.749 GiB per chip with xla,
6.779 GiB with Pallas flash attention taking the bias.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from dual_diffusion import sharding

IMPLS = ("auto", "xla", "cudnn", "pallas")
LANES = 128  # splash block sizes are multiples of the TPU lane width


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    logging.warning(msg)


def _xla(q, k, v, bias, scale):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


# --------------------------------------------------------------------------- splash (TPU)
def splash_block(length: int, preferred: int) -> tuple[int, int]:
    """(padded length, block): the length rounded up to the lane width and the largest block <= preferred
    (a multiple of 128) that divides it, so 1024 + 256 tokens use 256-blocks instead of padding to 1536."""
    padded = -(-length // LANES) * LANES
    block = max(LANES, min(preferred, padded) // LANES * LANES)
    while padded % block:
        block -= LANES
    return padded, block


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, q_padded: int, q_block: int, kv_padded: int, kv_block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    # Made once per shape, outside any trace: the kernel holds the mask's block tables as constants.
    mask = masks.MultiHeadMask([masks.FullMask((q_padded, kv_padded)) for _ in range(heads)])
    blocks = kernel.BlockSizes(block_q=q_block, block_kv=kv_block, block_kv_compute=kv_block, block_q_dkv=q_block,
                               block_kv_dkv=kv_block, block_kv_dkv_compute=kv_block, block_q_dq=q_block,
                               block_kv_dq=kv_block)
    with jax.ensure_compile_time_eval():
        return kernel.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, scale: float, block: int, interpret: bool):
    """Splash attention on one device's shard: q (B, Lq, H, D), k, v (B, Lk, H, D) -> (B, Lq, H, D).

    Lengths that are not a multiple of the lane width are padded; padded keys get their own segment id,
    so no query attends to them (padded queries attend the real keys and are cut off).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, q_len, h, _ = q.shape
    kv_len = k.shape[1]
    (q_padded, q_block), (kv_padded, kv_block) = splash_block(q_len, block), splash_block(kv_len, block)
    to_bhld = lambda x, n: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, n - x.shape[1]), (0, 0)))
    q = q * jnp.asarray(scale, q.dtype)  # the kernel does not scale its logits
    segments = None
    if kv_padded != kv_len:
        segments = SegmentIds(q=jnp.zeros((q_padded,), jnp.int32),
                              kv=jnp.asarray(np.arange(kv_padded) >= kv_len, jnp.int32))
    kern = _splash_kernel(h, q_padded, q_block, kv_padded, kv_block, interpret)
    out = jax.vmap(lambda qq, kk, vv: kern(qq, kk, vv, segment_ids=segments))(
        to_bhld(q, q_padded), to_bhld(k, kv_padded), to_bhld(v, kv_padded))
    return jnp.swapaxes(out[:, :, :q_len], 1, 2).astype(v.dtype)


def splash_attention(q, k, v, *, scale: float, block: int = 512, interpret: bool = False):
    """Splash attention, under shard_map over the active mesh's batch and head axes (when one is active).

    Mosaic kernels cannot be partitioned by XLA, so the call is mapped per device: each device runs the
    kernel on its rows and heads; the sequence stays whole (attention needs every key).
    """
    spec = sharding.activation_spec(("batch", None, "heads", None), q.shape)
    fn = functools.partial(_splash_local, scale=scale, block=block, interpret=interpret)
    if spec is None or all(axis is None for axis in spec):
        return fn(q, k, v)
    mesh = sharding.active_mesh_and_rules()[0]
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


# --------------------------------------------------------------------------- dispatch
def resolve_impl(impl: str, dtype, platform: str | None = None) -> str:
    """The implementation `attention` will try for this platform (default: the computation's) and dtype."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl={impl!r}; expected one of {IMPLS}")
    platform = sharding.compute_platform() if platform is None else platform
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if impl == "auto":
        if platform == "gpu" and half:
            return "cudnn"
        return "pallas" if platform == "tpu" else "xla"
    if impl == "cudnn" and (platform != "gpu" or not half):
        _warn_once(f"attention: cudnn needs a GPU and bf16/fp16 (platform={platform}, dtype={jnp.dtype(dtype)}); "
                   "using xla")
        return "xla"
    if impl == "pallas" and platform != "tpu":
        _warn_once(f"attention: pallas splash attention needs a TPU (platform={platform}); using xla")
        return "xla"
    return impl


def attention(q, k, v, *, impl: str = "auto", bias=None, scale: float | None = None, block: int = 512):
    """Multi-head attention without masking of keys beyond `bias`.

    Args:
      q: (B, Lq, H, D); k, v: (B, Lk, H, D) (Lq < Lk: text queries against cached image keys).
      bias: optional additive logits bias broadcastable to (B, H, Lq, Lk) (T5's relative positions).
      scale: logits scale; default 1/sqrt(D) (T5 passes 1.0).
      block: preferred splash block size (Runtime.attention_block).
    Returns:
      (B, Lq, H, D) in v's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    chosen = resolve_impl(impl, q.dtype)
    if chosen == "cudnn":
        if bias is None:
            try:
                return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
            except Exception as e:  # unsupported shape/head dim: fall back, loudly once
                _warn_once(f"attention: cudnn rejected q{q.shape} {q.dtype} ({type(e).__name__}: {e}); using xla")
        else:
            _warn_once("attention: cudnn path is used without a bias only; using xla for biased attention")
    elif chosen == "pallas" and bias is None:
        return splash_attention(q, k, v, scale=scale, block=block)
    return _xla(q, k, v, bias, scale)
