"""The one attention function every network calls.

`attention(q, k, v, impl=...)` picks the kernel from the config:
  xla     plain XLA (any backend, any dtype; the parity reference)
  cudnn   cuDNN flash attention (NVIDIA GPU, bf16/fp16)
  pallas  Pallas flash attention (TPU)
  auto    cudnn on GPU with bf16/fp16, pallas on TPU, else xla
An implementation that cannot serve a call (wrong backend, dtype, bias or
shape) falls back to xla, with one warning per reason.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging

IMPLS = ("auto", "xla", "cudnn", "pallas")


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    logging.warning(msg)


def _xla(q, k, v, bias, scale):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _pallas_tpu(q, k, v, bias, scale):
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    to_bhld = lambda x: jnp.swapaxes(x, 1, 2)
    out = flash_attention(to_bhld(q), to_bhld(k), to_bhld(v), ab=bias, sm_scale=scale)
    return jnp.swapaxes(out, 1, 2)


def resolve_impl(impl: str, dtype) -> str:
    """The implementation `attention` will try for this backend and dtype."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl={impl!r}; expected one of {IMPLS}")
    backend = jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if impl == "auto":
        if backend == "gpu" and half:
            return "cudnn"
        return "pallas" if backend == "tpu" else "xla"
    if impl == "cudnn" and (backend != "gpu" or not half):
        _warn_once(f"attention: cudnn needs a GPU and bf16/fp16 (backend={backend}, dtype={jnp.dtype(dtype)}); using xla")
        return "xla"
    if impl == "pallas" and backend != "tpu":
        _warn_once(f"attention: pallas flash attention needs a TPU (backend={backend}); using xla")
        return "xla"
    return impl


def attention(q, k, v, *, impl: str = "auto", bias=None, scale: float | None = None):
    """Multi-head attention without masking of keys beyond `bias`.

    Args:
      q: (B, Lq, H, D); k, v: (B, Lk, H, D).
      bias: optional additive logits bias broadcastable to (B, H, Lq, Lk) (T5's relative positions).
      scale: logits scale; default 1/sqrt(D) (T5 passes 1.0).
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
    elif chosen == "pallas":
        try:
            if bias is not None:
                bias = jnp.broadcast_to(bias, (q.shape[0], q.shape[2], q.shape[1], k.shape[1])).astype(jnp.float32)
            return _pallas_tpu(q, k, v, bias, scale)
        except Exception as e:
            _warn_once(f"attention: pallas rejected q{q.shape} ({type(e).__name__}: {e}); using xla")
    return _xla(q, k, v, bias, scale)
