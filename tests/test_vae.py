"""AutoencoderKL: float32 parity with diffusers through the key map, coverage, size, sharding names."""
import dual_diffusion  # noqa: F401  (sets flax config before modules are built)

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import nnx

from dual_diffusion.convert.keymap import load_torch_state
from dual_diffusion.convert.vae_keys import vae_rules
from dual_diffusion.models.configs import Runtime, VAEConfig, vae_to_diffusers
from dual_diffusion.models.vae import AutoencoderKL, sample_posterior
from dual_diffusion.sharding import DEFAULT_RULES, logical_to_mesh_spec

TINY = dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4)


def _torch_vae(cfg: VAEConfig, seed: int = 0) -> TorchAutoencoderKL:
    """diffusers' AutoencoderKL with SD3's options, every tensor (norms included) randomised."""
    torch.manual_seed(seed)
    config = {k: v for k, v in vae_to_diffusers(cfg).items() if not k.startswith("_")}
    config["sample_size"] = 32
    vae = TorchAutoencoderKL(**config).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))  # GroupNorm scales around 1, not 1 itself
            else:
                p.add_(0.1 * torch.randn_like(p))
    return vae


def _torch_state(vae) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in vae.state_dict().items()}


def _pair(cfg: VAEConfig, runtime: Runtime = Runtime()):
    vae = _torch_vae(cfg)
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, runtime, rngs=nnx.Rngs(0)))  # no init: all is loaded
    load_torch_state(model, _torch_state(vae), vae_rules(cfg))
    return vae, model


def _rel_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("layers_per_block,latent_channels", [(2, 16), (1, 4)])
def test_parity_with_diffusers(layers_per_block, latent_channels):
    cfg = VAEConfig(latent_channels=latent_channels, layers_per_block=layers_per_block, **TINY)
    vae, model = _pair(cfg)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    latents = rng.normal(size=(2, 4, 4, latent_channels)).astype(np.float32)
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
        ref_mean = posterior.mean.permute(0, 2, 3, 1).numpy()
        ref_logvar = posterior.logvar.permute(0, 2, 3, 1).numpy()
        ref_images = vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()

    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda s, x: (nnx.merge(graphdef, s).encode_moments(x), nnx.merge(graphdef, s).encode(x)))
    decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
    (mean, logvar), mean_only = encode(state, images)
    decoded = decode(state, latents)

    assert mean.shape == ref_mean.shape == (2, 4, 4, latent_channels)
    assert decoded.shape == ref_images.shape == (2, 32, 32, 3)
    errs = {"mean": _rel_err(mean, ref_mean), "logvar": _rel_err(logvar, ref_logvar),
            "decode": _rel_err(decoded, ref_images)}
    print(f"VAE parity (lpb={layers_per_block}, C={latent_channels}) max|err|/max|ref|: {errs}")
    assert max(errs.values()) <= 1e-4, errs
    np.testing.assert_allclose(np.asarray(mean_only), np.asarray(mean), rtol=0, atol=1e-6)


@pytest.mark.parametrize("layers_per_block,add_attention", [(2, True), (1, True), (2, False)])
def test_key_map_covers_both_ways(layers_per_block, add_attention):
    cfg = VAEConfig(layers_per_block=layers_per_block, mid_block_add_attention=add_attention, **TINY)
    rules = vae_rules(cfg)
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    torch_state = _torch_vae(cfg).state_dict()
    targets, sources = [r.target for r in rules], [r.source for r in rules]
    assert len(set(targets)) == len(targets) and len(set(sources)) == len(sources)
    assert set(targets) == set(params)
    assert set(sources) == set(torch_state)
    for r in rules:  # layouts agree too, not just names
        assert r.torch_shape(params[r.target].shape) == tuple(torch_state[r.source].shape), r


def test_full_size_parameter_count_and_logical_names():
    model = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig(), rngs=nnx.Rngs(0)))
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert sum(int(np.prod(v.shape)) for _, v in params) == 83_819_683
    for path, var in params:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), (path, names, var.shape)
        logical_to_mesh_spec(names, DEFAULT_RULES)  # every name is in the shared vocabulary


def test_bfloat16_compute_tracks_float32():
    cfg = VAEConfig(latent_channels=16, **TINY)
    vae, model = _pair(cfg)
    bf16 = nnx.eval_shape(lambda: AutoencoderKL(cfg, Runtime(dtype="bfloat16"), rngs=nnx.Rngs(0)))
    nnx.update(bf16, nnx.state(model))  # same float32 parameters, bf16 compute

    @jax.jit
    def round_trip(images):
        mean32, mean16 = model.encode(images), bf16.encode(images)
        return mean32, mean16, model.decode(mean32), bf16.decode(mean32)

    images = np.random.default_rng(1).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    mean32, mean16, images32, images16 = round_trip(images)
    assert mean16.dtype == images16.dtype == jnp.float32
    assert jax.tree.leaves(nnx.state(bf16))[0].dtype == jnp.float32
    errs = _rel_err(mean16, np.asarray(mean32)), _rel_err(images16, np.asarray(images32))
    print(f"VAE bf16 vs fp32 max|err|/max|ref| (mean, decode): {errs}")
    assert max(errs) < 5e-2, errs


def test_posterior_sample_statistics_and_shape_errors():
    mean = jnp.full((4, 8, 8, 16), 0.5)
    logvar = jnp.full((4, 8, 8, 16), np.log(0.25))
    z = sample_posterior(mean, logvar, jax.random.key(0))
    assert abs(float(z.mean()) - 0.5) < 0.02 and abs(float(z.std()) - 0.5) < 0.02
    model = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig(**TINY), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="multiples of the downsample factor 8"):
        model.encode(jnp.zeros((1, 36, 32, 3)))
    with pytest.raises(ValueError, match=r"\(B, H, W, 16\)"):
        model.decode(jnp.zeros((1, 4, 4, 4)))
