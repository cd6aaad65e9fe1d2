"""Analytic FLOP counts of D-DiT, as pure functions of the architecture configs.

Counted the way the PyTorch anchor counts them (/work/shared/bench/torch_anchor.py
uses torch's FlopCounterMode): 2 FLOPs per multiply-add of every matmul (linears,
the patch-embedding convolution, attention's QK^T and PV); no elementwise work,
no norms, no softmax, no optimizer, biases not counted. Model FLOPs only:
rematerialisation and batched dead work (e.g. the fused step's image head on the
text half) are not counted, so MFU compares like with like.

Backward = what reverse-mode autodiff must do for the loss:
  2x the forward of a matmul whose input carries a gradient (input and weight grads);
  2.5x for attention: torch counts five matmuls in the attention backward, the
     flash-attention recomputation of QK^T included (flop_counter.sdpa_backward_flop_count);
  1x for a matmul whose input is a constant (patch embedding of the latents, the
     timestep embedder's first linear on the sinusoid, `context_embedder` on the
     frozen T5 states): only the weight gradient;
  0x for parts that feed only the other half's output: in the image half the text
     head and the last block's text stream after attention, in the text half the
     image head and the last block's image stream after attention.
`naive_train_step` gives the usual "3x forward" rule of thumb for comparison.

Sizes: `image_tokens` = (latent side / patch)^2 (0 with no image: the null image
tokens stand in), `text_tokens` = the text length L.
"""
from __future__ import annotations

from dual_diffusion.models.configs import MMDiTConfig, T5Config

TIME_FREQ_DIM = 256  # sinusoidal timestep features (REFERENCE.md, Network)


def linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def attention(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> int:
    """QK^T and PV."""
    return 2 * 2 * batch * heads * q_len * kv_len * head_dim


def num_image_tokens(cfg: MMDiTConfig, latent_side: int) -> int:
    if latent_side % cfg.patch_size:
        raise ValueError(f"latent side {latent_side} is not divisible by patch_size {cfg.patch_size}")
    return (latent_side // cfg.patch_size) ** 2


def mmdit_forward_parts(cfg: MMDiTConfig, batch: int, image_tokens: int, text_tokens: int) -> dict[str, int]:
    """Forward FLOPs of one MM-DiT call, by part (see `BACKWARD_FACTORS` for the part names)."""
    b, l, d, H = batch, text_tokens, cfg.hidden_size, cfg.num_attention_heads
    has_image = image_tokens > 0
    n = image_tokens if has_image else cfg.num_null_image_tokens
    patch_dim = cfg.patch_size ** 2
    last = cfg.num_layers - 1

    def stream_pre(tokens):  # q, k, v
        return linear(b * tokens, d, 3 * d)

    def stream_post(tokens):  # attention output projection + 4x GELU MLP
        return linear(b * tokens, d, d) + 2 * linear(b * tokens, d, 4 * d)

    p = dict.fromkeys(BACKWARD_FACTORS["image"], 0)
    p["patch_embed"] = linear(b * n, cfg.in_channels * patch_dim, d) if has_image else 0
    p["time_embed_in"] = linear(b, TIME_FREQ_DIM, d)
    p["time_embed_out"] = linear(b, d, d)
    p["context_embedder"] = linear(b * l, cfg.joint_attention_dim, d)
    for i in range(cfg.num_layers):
        dual = i in cfg.dual_attention_layers
        p["modulation"] += linear(b, d, (9 if dual else 6) * d) + linear(b, d, 6 * d)
        p["qkv"] += stream_pre(n) + stream_pre(l)
        p["attention"] += attention(b, H, n + l, n + l, cfg.attention_head_dim)
        # SD3.5 dual blocks: an image-only self-attention (own q, k, v, output) after the joint one.
        attn2 = (stream_pre(n) + attention(b, H, n, n, cfg.attention_head_dim) + linear(b * n, d, d)) if dual else 0
        if i == last:  # what follows the last joint attention feeds one head only
            p["last_image_post"] = stream_post(n) + attn2
            p["last_text_post"] = stream_post(l)
        else:
            p["post"] += stream_post(n) + stream_post(l) + attn2
    if has_image:
        p["image_head"] = linear(b, d, 2 * d) + linear(b * n, d, patch_dim * cfg.out_channels)
    p["text_head"] = linear(b * l, d, cfg.vocab_size)
    return p


# Backward multiplier per part, for a loss on the image velocity or on the text logits.
_COMMON = dict(patch_embed=1, time_embed_in=1, time_embed_out=2, context_embedder=1, modulation=2, qkv=2,
               attention=2.5, post=2)
BACKWARD_FACTORS = {
    "image": dict(_COMMON, last_image_post=2, last_text_post=0, image_head=2, text_head=0),
    "text": dict(_COMMON, last_image_post=0, last_text_post=2, image_head=0, text_head=2),
}


def mmdit_forward(cfg: MMDiTConfig, batch: int, image_tokens: int, text_tokens: int) -> int:
    return sum(mmdit_forward_parts(cfg, batch, image_tokens, text_tokens).values())


def mmdit_text_only_forward(cfg: MMDiTConfig, batch: int, image_tokens: int, text_tokens: int) -> int:
    """`MMDiT.text_logits` with cached image keys and values: per block the text stream's modulation,
    q/k/v, attention of the L text queries over N + L keys, output projection and MLP; the text head."""
    b, l, d, H = batch, text_tokens, cfg.hidden_size, cfg.num_attention_heads
    per_layer = (linear(b, d, 6 * d) + linear(b * l, d, 3 * d)
                 + attention(b, H, l, image_tokens + l, cfg.attention_head_dim)
                 + linear(b * l, d, d) + 2 * linear(b * l, d, 4 * d))
    return (linear(b, TIME_FREQ_DIM, d) + linear(b, d, d) + linear(b * l, cfg.joint_attention_dim, d)
            + cfg.num_layers * per_layer + linear(b * l, d, cfg.vocab_size))


def mmdit_forward_backward(cfg: MMDiTConfig, batch: int, image_tokens: int, text_tokens: int, loss_on: str) -> int:
    """Forward + backward of one call whose loss reads `loss_on` ("image" or "text")."""
    if loss_on not in BACKWARD_FACTORS:
        raise ValueError(f"loss_on={loss_on!r}; expected one of {sorted(BACKWARD_FACTORS)}")
    parts = mmdit_forward_parts(cfg, batch, image_tokens, text_tokens)
    # Attention FLOPs are multiples of 4, so the 2.5 factor stays an exact integer.
    return int(sum(v * (1 + BACKWARD_FACTORS[loss_on][k]) for k, v in parts.items()))


def t5_forward(cfg: T5Config, batch: int, tokens: int) -> int:
    """T5 encoder forward: q/k/v/o, attention (the relative bias is a gather, no FLOPs), feed-forward."""
    inner = cfg.num_heads * cfg.d_kv
    rows = batch * tokens
    ff_mats = 3 if cfg.feed_forward_proj == "gated-gelu" else 2
    per_layer = (3 * linear(rows, cfg.d_model, inner) + linear(rows, inner, cfg.d_model)
                 + attention(batch, cfg.num_heads, tokens, tokens, cfg.d_kv)
                 + (ff_mats - 1) * linear(rows, cfg.d_model, cfg.d_ff) + linear(rows, cfg.d_ff, cfg.d_model))
    return cfg.num_layers * per_layer


def train_step(mmdit: MMDiTConfig, t5: T5Config, batch: int, latent_side: int, text_tokens: int) -> int:
    """One dual-loss step on `batch` pairs per half: two T5 forwards (clean caption, masked ids) and
    the MM-DiT forward + backward of the image half (noisy latents) and of the text half (clean image)."""
    n = num_image_tokens(mmdit, latent_side)
    return (2 * t5_forward(t5, batch, text_tokens)
            + mmdit_forward_backward(mmdit, batch, n, text_tokens, "image")
            + mmdit_forward_backward(mmdit, batch, n, text_tokens, "text"))


def naive_train_step(mmdit: MMDiTConfig, t5: T5Config, batch: int, latent_side: int, text_tokens: int) -> int:
    """The rule of thumb: 3x the MM-DiT forward of both halves + two T5 forwards."""
    n = num_image_tokens(mmdit, latent_side)
    return 2 * t5_forward(t5, batch, text_tokens) + 2 * 3 * mmdit_forward(mmdit, batch, n, text_tokens)


def text_to_image(mmdit: MMDiTConfig, t5: T5Config, batch: int, latent_side: int, text_tokens: int,
                  steps: int, cfg_guidance: bool = True) -> int:
    """Euler sampling: T5 on prompt (+ empty prompt), one MM-DiT call per step on 2B rows with CFG."""
    rows = 2 * batch if cfg_guidance else batch
    return (rows * t5_forward(t5, 1, text_tokens)
            + steps * mmdit_forward(mmdit, rows, num_image_tokens(mmdit, latent_side), text_tokens))


def text_prediction(mmdit: MMDiTConfig, t5: T5Config, batch: int, latent_side: int, text_tokens: int,
                    image_cached: bool = False) -> int:
    """One prediction of the text samplers: T5 on the current ids + MM-DiT with the clean image, in full
    or (image_cached) text tokens only over the cached image keys and values."""
    n = num_image_tokens(mmdit, latent_side)
    mmdit_part = (mmdit_text_only_forward if image_cached else mmdit_forward)(mmdit, batch, n, text_tokens)
    return t5_forward(t5, batch, text_tokens) + mmdit_part


def image_to_text(mmdit: MMDiTConfig, t5: T5Config, batch: int, latent_side: int, text_tokens: int,
                  predictions: int, cached_predictions: int = 0) -> int:
    """A caption / VQA answer with `predictions` network evaluations (prediction caching's reused steps
    cost nothing), `cached_predictions` of them text-only over the image K/V cache."""
    full = text_prediction(mmdit, t5, batch, latent_side, text_tokens)
    cached = text_prediction(mmdit, t5, batch, latent_side, text_tokens, image_cached=True)
    return (predictions - cached_predictions) * full + cached_predictions * cached
