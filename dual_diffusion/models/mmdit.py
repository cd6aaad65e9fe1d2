"""The D-DiT network: SD3's MM-DiT with a full last block, an image head and a text head.

REFERENCE.md, Network. Image latents (NHWC) become patch tokens, text hidden
states go through `context_embedder` (plus, if `text_pos_embed_len > 0`, a
learned text position table: an option for models trained from scratch, absent
from the release); every block is a joint block (two streams with their own
AdaLN-Zero modulation, q/k/v, output projection and GELU(tanh) MLP; one
attention over [image; text]). The forward returns the rectified-flow velocity
(NHWC) and the text logits.

Precision: parameters stay in `runtime.param_dtype`; matmuls run in
`runtime.dtype`; the residual streams, norms and softmax are float32, and both
outputs (velocity and logits) are float32 whatever the compute dtype.

Layers are stored one module per block (`blocks[i]`), so checkpoints do not
depend on `runtime.scan_layers`; scanning stacks the per-block states inside
the traced call.

Text decoding with a clean, fixed image (captions, VQA) can skip the image
stream: `logits_and_image_kv` is the full forward that also returns every
layer's image keys and values (`ImageKV`), and `text_logits` runs only the text
tokens through the blocks, attending to those cached keys/values plus fresh
text ones. With the cache of the same text it equals the full forward; with
later text it is an approximation (in the full network the image stream also
reads the text), which the samplers refresh (diffusion/text_sampling.py).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dual_diffusion.models.attention import attention
from dual_diffusion.sharding import constrain
from dual_diffusion.models.configs import MMDiTConfig, Runtime
from dual_diffusion.models.embeddings import PatchEmbed, TimestepEmbedder
from dual_diffusion.models.layers import (KeyStream, Linear, RMSNorm, check_remat_policy, layer_norm, param, remat,
                                          zeros)


STREAM = ("batch", "seq", None)  # residual streams: rows over the batch axes, width whole on every chip
HEADS = ("batch", "seq", "heads", None)


def _modulate(x_norm, shift_BxD, scale_BxD):
    return x_norm * (1 + scale_BxD[:, None, :]) + shift_BxD[:, None, :]


class MLP(nnx.Module):
    """fc2(gelu_tanh(fc1(x))), 4x wide (diffusers FeedForward 'gelu-approximate')."""

    def __init__(self, hidden: int, runtime: Runtime, *, rngs: nnx.Rngs):
        kw = dict(dtype=runtime.dtype, param_dtype=runtime.param_dtype, rngs=rngs)
        self.fc1 = Linear(hidden, 4 * hidden, ("embed", "mlp"), **kw)
        self.fc2 = Linear(4 * hidden, hidden, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(constrain(self.fc1(x), ("batch", "seq", "mlp")), approximate=True))


class QKV(nnx.Module):
    """One stream's q/k/v projections, with optional per-head RMS qk-norm (SD3.5)."""

    def __init__(self, cfg: MMDiTConfig, runtime: Runtime, *, rngs: nnx.Rngs):
        d, self.heads = cfg.hidden_size, cfg.num_attention_heads
        kw = dict(dtype=runtime.dtype, param_dtype=runtime.param_dtype, rngs=rngs)
        self.q = Linear(d, d, ("embed", "heads"), **kw)
        self.k = Linear(d, d, ("embed", "heads"), **kw)
        self.v = Linear(d, d, ("embed", "heads"), **kw)
        if cfg.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"MMDiTConfig.qk_norm={cfg.qk_norm!r}; supported: None, 'rms_norm'")
        norm = lambda: RMSNorm(cfg.attention_head_dim, eps=1e-6, param_dtype=runtime.param_dtype, rngs=rngs)
        self.norm_q = norm() if cfg.qk_norm else None
        self.norm_k = norm() if cfg.qk_norm else None

    def __call__(self, x_BxLxD):
        b, l, _ = x_BxLxD.shape
        split = lambda t: constrain(t.reshape(b, l, self.heads, -1), HEADS)
        q, k, v = split(self.q(x_BxLxD)), split(self.k(x_BxLxD)), split(self.v(x_BxLxD))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        return q, k, v


class SelfAttention(nnx.Module):
    """The image-only attention of SD3.5 dual-attention blocks (diffusers `attn2`)."""

    def __init__(self, cfg: MMDiTConfig, runtime: Runtime, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.impl, self.block = runtime.attention_impl, runtime.attention_block
        self.qkv = QKV(cfg, runtime, rngs=rngs)
        self.out = Linear(d, d, ("heads", "embed"), dtype=runtime.dtype, param_dtype=runtime.param_dtype,
                          rngs=rngs)

    def __call__(self, x_BxLxD):
        q, k, v = self.qkv(x_BxLxD)
        o = attention(q, k, v, impl=self.impl, block=self.block)
        return self.out(o.reshape(o.shape[0], o.shape[1], -1))


class JointBlock(nnx.Module):
    """One MM-DiT block updating both streams (diffusers JointTransformerBlock, context_pre_only=False)."""

    def __init__(self, cfg: MMDiTConfig, runtime: Runtime, *, dual_attention: bool, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.impl, self.block = runtime.attention_impl, runtime.attention_block
        kw = dict(dtype=runtime.dtype, param_dtype=runtime.param_dtype, rngs=rngs)
        # AdaLN-Zero: modulations start at zero so every block starts as the identity.
        mod = lambda n: Linear(d, n * d, ("embed", "mlp"), kernel_init=zeros, **kw)
        self.img_mod = mod(9 if dual_attention else 6)
        self.txt_mod = mod(6)
        self.img_qkv = QKV(cfg, runtime, rngs=rngs)
        self.txt_qkv = QKV(cfg, runtime, rngs=rngs)
        self.img_out = Linear(d, d, ("heads", "embed"), **kw)
        self.txt_out = Linear(d, d, ("heads", "embed"), **kw)
        self.attn2 = SelfAttention(cfg, runtime, rngs=rngs) if dual_attention else None
        self.img_mlp = MLP(d, runtime, rngs=rngs)
        self.txt_mlp = MLP(d, runtime, rngs=rngs)

    def _text_modulation(self, temb_BxD):
        """(shift, scale, gate, shift_mlp, scale_mlp, gate_mlp) of the text stream, each (B, D)."""
        return jnp.split(self.txt_mod(jax.nn.silu(temb_BxD)), 6, axis=-1)

    def _text_qkv(self, c_BxLxD, mod):
        return self.txt_qkv(_modulate(layer_norm(c_BxLxD), mod[0], mod[1]))

    def _text_update(self, c_BxLxD, o_BxLxHxD, mod):
        """The text stream after its share of the joint attention output: projection, then MLP."""
        _, _, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = mod
        o = constrain(o_BxLxHxD, HEADS).reshape(o_BxLxHxD.shape[0], o_BxLxHxD.shape[1], -1)
        c = c_BxLxD + c_gate[:, None] * self.txt_out(o)
        c = c + c_gate_mlp[:, None] * self.txt_mlp(_modulate(layer_norm(c), c_shift_mlp, c_scale_mlp))
        return constrain(c, STREAM)

    def forward_with_image_kv(self, x_BxNxD, c_BxLxD, temb_BxD):
        """__call__ that also returns the image tokens' keys and values (each (B, N, H, Dh)) of the joint
        attention: what `text_only` attends to."""
        x_BxNxD, c_BxLxD = constrain(x_BxNxD, STREAM), constrain(c_BxLxD, STREAM)
        img = jnp.split(self.img_mod(jax.nn.silu(temb_BxD)), 9 if self.attn2 is not None else 6, axis=-1)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = img[:6]
        txt = self._text_modulation(temb_BxD)

        x_norm = layer_norm(x_BxNxD)
        qi, ki, vi = self.img_qkv(_modulate(x_norm, shift, scale))
        qt, kt, vt = self._text_qkv(c_BxLxD, txt)
        n = x_BxNxD.shape[1]
        cat = lambda a, b: jnp.concatenate([a, b], axis=1)
        o = constrain(attention(cat(qi, qt), cat(ki, kt), cat(vi, vt), impl=self.impl, block=self.block), HEADS)

        x = x_BxNxD + gate[:, None] * self.img_out(o[:, :n].reshape(o.shape[0], n, -1))
        if self.attn2 is not None:
            # SD3.5: the second attention reads the pre-attention norm with its own shift/scale.
            shift2, scale2, gate2 = img[6:]
            x = x + gate2[:, None] * self.attn2(_modulate(x_norm, shift2, scale2))
        x = x + gate_mlp[:, None] * self.img_mlp(_modulate(layer_norm(x), shift_mlp, scale_mlp))
        return constrain(x, STREAM), self._text_update(c_BxLxD, o[:, n:], txt), (ki, vi)

    def __call__(self, x_BxNxD, c_BxLxD, temb_BxD):
        """Image tokens x, text tokens c (float32 residual streams), conditioning temb -> (x, c)."""
        x, c, _ = self.forward_with_image_kv(x_BxNxD, c_BxLxD, temb_BxD)
        return x, c

    def text_only(self, c_BxLxD, temb_BxD, image_kv):
        """The text stream's update with the image's keys and values given, (k, v) each (B, N, H, Dh):
        text queries attend to [image; text] keys as in __call__; the image stream is not computed."""
        c_BxLxD = constrain(c_BxLxD, STREAM)
        txt = self._text_modulation(temb_BxD)
        qt, kt, vt = self._text_qkv(c_BxLxD, txt)
        ki, vi = image_kv
        cat = lambda a, b: jnp.concatenate([a, b], axis=1)
        o = attention(qt, cat(ki, kt), cat(vi, vt), impl=self.impl, block=self.block)
        return self._text_update(c_BxLxD, o, txt)


class ImageKV(NamedTuple):
    """Per-layer keys and values of the image tokens, each (layers, B, N, H, Dh): `MMDiT.text_logits`' cache."""

    k: jax.Array
    v: jax.Array


class MMDiT(nnx.Module):
    """D-DiT MM-DiT. See the module docstring; paths of parameters are listed by convert/mmdit_keys.py."""

    def __init__(self, cfg: MMDiTConfig, runtime: Runtime = Runtime(), *, rngs: nnx.Rngs):
        d, p = cfg.hidden_size, cfg.patch_size
        bad = [i for i in cfg.dual_attention_layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"MMDiTConfig.dual_attention_layers={cfg.dual_attention_layers}: {bad} not in "
                             f"[0, {cfg.num_layers})")
        check_remat_policy(runtime.remat_policy)
        self.cfg, self.runtime = cfg, runtime
        rngs = KeyStream(rngs.params())  # cheap key draws under tracing (see KeyStream)
        kw = dict(dtype=runtime.dtype, param_dtype=runtime.param_dtype, rngs=rngs)
        self.pos_embed = PatchEmbed(patch_size=p, in_channels=cfg.in_channels, hidden=d,
                                    pos_embed_max_size=cfg.pos_embed_max_size, base_size=cfg.sample_size // p, **kw)
        self.time_embed = TimestepEmbedder(d, **kw)
        self.context_embedder = Linear(cfg.joint_attention_dim, d, ("mlp", "embed"), **kw)
        self.blocks = nnx.List([JointBlock(cfg, runtime, dual_attention=i in cfg.dual_attention_layers, rngs=rngs)
                                for i in range(cfg.num_layers)])
        # Heads start at zero as in DiT: velocity 0 and uniform text logits at step 0.
        self.image_out_mod = Linear(d, 2 * d, ("embed", "mlp"), kernel_init=zeros, **kw)
        self.image_out_proj = Linear(d, p * p * cfg.out_channels, ("embed", None), kernel_init=zeros, **kw)
        self.text_out_proj = Linear(d, cfg.vocab_size, ("embed", "vocab"), kernel_init=zeros, **kw)
        self.null_image_embd = param(nnx.initializers.normal(d ** -0.5), rngs, (1, cfg.num_null_image_tokens, d),
                                     (None, None, "embed"), runtime.param_dtype)
        self.text_pos_embed = (param(nnx.initializers.normal(d ** -0.5), rngs, (1, cfg.text_pos_embed_len, d),
                                     (None, None, "embed"), runtime.param_dtype)
                               if cfg.text_pos_embed_len else None)

    def _block_runs(self) -> list[tuple[nnx.GraphDef, list]]:
        """Blocks as (graphdef, [states]) runs; with scan_layers, identical consecutive blocks share a run."""
        runs: list[tuple[nnx.GraphDef, list]] = []
        for block in self.blocks:
            graphdef, state = nnx.split(block)
            if runs and self.runtime.scan_layers and runs[-1][0] == graphdef:
                runs[-1][1].append(state)
            else:
                runs.append((graphdef, [state]))
        return runs

    def _apply_blocks(self, step: Callable, carry, temb, per_layer=None):
        """Folds `step(block, carry, temb, x_l) -> (carry, y_l)` over the blocks in order.

        per_layer: a pytree with a leading layer axis whose l-th slice is x_l (None: x_l = None).
        Each run of `_block_runs` with more than one block is one lax.scan, rematerialised per the
        runtime's policy. Returns (carry, the y_l stacked on a leading layer axis, or None).
        """
        ys, start = [], 0
        for graphdef, states in self._block_runs():
            n = len(states)

            def fn(state, carry, temb, x, graphdef=graphdef):
                return step(nnx.merge(graphdef, state), carry, temb, x)

            fn = remat(fn, self.runtime.remat_policy)
            xs = None if per_layer is None else jax.tree.map(lambda a: a[start:start + n], per_layer)
            if n == 1:
                carry, y = fn(states[0], carry, temb, jax.tree.map(lambda a: a[0], xs))
                y = jax.tree.map(lambda a: a[None], y)
            else:
                stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
                carry, y = jax.lax.scan(lambda carry, sx, fn=fn: fn(sx[0], carry, temb, sx[1]), carry, (stacked, xs))
            ys.append(y)
            start += n
        if ys[0] is None:
            return carry, None
        return carry, jax.tree.map(lambda *parts: jnp.concatenate(parts), *ys)

    def _embed(self, latents, text_hidden, timestep):
        """(image tokens (B, N, D), text tokens (B, L, D), temb (B, D)): the streams entering the blocks."""
        b = text_hidden.shape[0]
        if latents is not None:
            x = self.pos_embed(latents)
        else:
            x = jnp.broadcast_to(self.null_image_embd[...].astype(jnp.float32), (b,) + self.null_image_embd.shape[1:])
        return constrain(x, STREAM), self._embed_text(text_hidden), self.time_embed(timestep)

    def _embed_text(self, text_hidden):
        c = self.context_embedder(text_hidden, out_dtype=jnp.float32)
        if self.text_pos_embed is not None:
            n_max = self.text_pos_embed.shape[1]
            if c.shape[1] > n_max:
                raise ValueError(f"MMDiT: text length {c.shape[1]} exceeds text_pos_embed_len={n_max}")
            c = c + self.text_pos_embed[:, :c.shape[1]].astype(jnp.float32)
        return constrain(c, STREAM)

    def _text_head(self, c):
        return constrain(self.text_out_proj(layer_norm(c), out_dtype=jnp.float32), ("batch", "seq", "vocab"))

    def __call__(self, latents, text_hidden, timestep, *, image_rows=None, text_rows=None):
        """Velocity and text logits.

        Args:
          latents: (B, H, W, in_channels) noisy latents, or None for a text-only call
            (the learned null image tokens stand in for the image).
          text_hidden: (B, L, joint_attention_dim) text encoder states.
          timestep: (B,) on the 0..1000 scale.
          image_rows, text_rows: optional functions (B, ...) -> (B', ...) picking the rows whose velocity /
            logits are wanted: the fused loss runs each head on its own half only (no 32100-wide logits
            for the text-to-image rows).
        Returns:
          velocity (B', H, W, out_channels) float32, or None without latents;
          logits (B', L, vocab_size) float32.
        """
        x, c, temb = self._embed(latents, text_hidden, timestep)
        (x, c), _ = self._apply_blocks(lambda block, xc, temb, _: (block(*xc, temb), None), (x, c), temb)

        velocity = None
        if latents is not None:
            pick = image_rows or (lambda rows: rows)
            x, temb_x = pick(x), pick(temb)
            scale, shift = jnp.split(self.image_out_mod(jax.nn.silu(temb_x)), 2, axis=-1)
            patches = self.image_out_proj(_modulate(layer_norm(x), shift, scale), out_dtype=jnp.float32)
            _, hh, ww, _ = latents.shape
            p, oc = self.cfg.patch_size, self.cfg.out_channels
            h, w, b = hh // p, ww // p, x.shape[0]
            velocity = patches.reshape(b, h, w, p, p, oc).transpose(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, oc)
            velocity = constrain(velocity, ("batch", None, None, None))
        return velocity, self._text_head(text_rows(c) if text_rows is not None else c)

    # ---- image K/V cache: text decoding with a clean, fixed image
    def logits_and_image_kv(self, latents, text_hidden, timestep) -> tuple[jax.Array, ImageKV]:
        """The text logits of __call__ (B, L, vocab) and every layer's image keys and values (ImageKV).

        While a caption or answer is decoded the image is clean and fixed, so `text_logits` can reuse
        these keys and values for later text: an approximation, since in the full network they also
        depend on the text through the joint attention of the blocks before.
        """
        x, c, temb = self._embed(latents, text_hidden, timestep)

        def step(block, xc, temb, _):
            x, c, kv = block.forward_with_image_kv(*xc, temb)
            return (x, c), kv

        (_, c), (k, v) = self._apply_blocks(step, (x, c), temb)
        return self._text_head(c), ImageKV(k, v)

    def text_logits(self, text_hidden, timestep, image_kv: ImageKV) -> jax.Array:
        """Text logits (B, L, vocab) from the text tokens only: in every block the text attends to the
        cached image keys and values plus its own; the image stream is not run. With the cache of the
        same text, equal to `logits_and_image_kv`'s logits (to float rounding)."""
        c, temb = self._embed_text(text_hidden), self.time_embed(timestep)
        c, _ = self._apply_blocks(lambda block, c, temb, kv: (block.text_only(c, temb, kv), None), c, temb,
                                  per_layer=tuple(image_kv))
        return self._text_head(c)


def init_mmdit(cfg: MMDiTConfig, runtime: Runtime = Runtime(), seed: int = 0) -> MMDiT:
    """A freshly initialised MMDiT (training from scratch)."""
    return MMDiT(cfg, runtime, rngs=nnx.Rngs(seed))


def abstract_mmdit(cfg: MMDiTConfig, runtime: Runtime = Runtime()) -> MMDiT:
    """The MMDiT with ShapeDtypeStruct leaves (no memory): for shardings, counts and restores."""
    return nnx.eval_shape(lambda: MMDiT(cfg, runtime, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module) -> int:
    """Number of parameter scalars (nnx.Param leaves; buffers such as the position grid excluded)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
