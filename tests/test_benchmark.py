"""The benchmark command on CPU with a tiny config, and the analytic FLOPs against torch's counter.

The FLOP parity runs the PyTorch anchor itself (/work/shared/bench/torch_anchor.py --tiny)
under FlopCounterMode. torch counts CPU attention with no formula (its CPU flash kernel,
`_scaled_dot_product_flash_attention_for_cpu`, is not registered, unlike the GPU kernels),
so the wrapper below registers torch's own SDPA formulas for it; then the count is what the
anchor reports on a GPU, and dual_diffusion/flops.py must equal it exactly.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dual_diffusion  # noqa: F401
from dual_diffusion import benchmark, flops
from dual_diffusion.models.configs import MMDiTConfig, T5Config, mmdit_from_diffusers

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT.parent / "shared" / "bench"
sys.path.insert(0, str(ROOT))
from configs import stage2  # noqa: E402

TINY_OVERRIDES = [
    "--config.model.transformer.num_layers=2", "--config.model.transformer.num_attention_heads=2",
    "--config.model.transformer.attention_head_dim=16", "--config.model.transformer.joint_attention_dim=32",
    "--config.model.text_encoder.num_layers=1", "--config.model.text_encoder.d_model=32",
    "--config.model.text_encoder.d_ff=64", "--config.model.text_encoder.num_heads=2",
    "--config.tokenizer.train_vocab_size=64",
]
COMMON_FIELDS = ("what", "batch", "sec", "flops_per_step", "achieved_tflops", "mfu_vs_989", "peak_mem_gib",
                 "compile_sec", "device", "params", "image_size", "latent_side", "text_length", "dtype",
                 "attention_impl", "scan_layers", "remat_policy")
RATE = {"train": "samples_per_sec", "t2i": "images_per_sec", "caption": "tokens_per_sec", "vqa": "tokens_per_sec"}


def _single_device_env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    # conftest asks for 8 host devices; the command runs as on one GPU.
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    # Cheap CPU code generation: this test checks the command, not CPU speed (compiles ~3x faster).
    env["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true".strip()
    return env


@pytest.mark.slow
def test_command_prints_one_json_line_per_measurement():
    cmd = [sys.executable, "-m", "dual_diffusion.benchmark", "--config=configs/demo.py:full", *TINY_OVERRIDES,
           "--what=train,t2i,caption,vqa", "--batch=2", "--iters=1", "--warmup=1", "--text_length=16",
           "--t2i_steps=2", "--caption_length=12", "--caption_steps=4", "--vqa_prompt_tokens=8", "--vqa_steps=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_single_device_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout holds JSON lines only
    assert [r["what"] for r in rows] == ["train", "t2i", "caption", "vqa"]

    mmdit = MMDiTConfig(sample_size=32, patch_size=4, in_channels=3, out_channels=3, num_layers=2,
                        num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
                        pos_embed_max_size=16, vocab_size=64, num_null_image_tokens=4)
    t5 = T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
    for r in rows:
        for field in COMMON_FIELDS + (RATE[r["what"]],):
            assert field in r, (r["what"], field)
        assert r["batch"] == 2 and r["device"] == "cpu" and r["peak_mem_gib"] is None
        assert r["params"]["transformer"] > 0 and r["params"]["text_encoder"] > 0
        for field in ("sec", "compile_sec", RATE[r["what"]], "achieved_tflops"):
            assert math.isfinite(r[field]) and r[field] > 0, (r["what"], field, r[field])
        assert r["achieved_tflops"] == pytest.approx(r["flops_per_step"] / r["sec"] / 1e12)
        assert r["mfu_vs_989"] == pytest.approx(r["achieved_tflops"] / 989.4)
        assert r["latent_side"] == 32 and r["dtype"] == "float32"
    train, t2i, caption, vqa = rows
    assert train["flops_per_step"] == flops.train_step(mmdit, t5, 2, 32, 16)
    assert train["samples_per_sec"] == pytest.approx(2 / train["sec"])
    assert t2i["flops_per_step"] == flops.text_to_image(mmdit, t5, 2, 32, 16, steps=2)
    assert t2i["images_per_sec"] == pytest.approx(2 / t2i["sec"])
    # Without an early stop every step reveals something, so each step predicts; +1 if the final argmax ran.
    assert 1 <= caption["predictions"] <= 5 and caption["text_length"] == 12
    assert caption["flops_per_step"] == flops.image_to_text(mmdit, t5, 2, 32, 12, caption["predictions"])
    assert caption["tokens_per_sec"] == pytest.approx(2 * 12 / caption["sec"])
    assert vqa["generated_tokens"] == 8 and 1 <= vqa["predictions"] <= 3
    assert vqa["flops_per_step"] == flops.image_to_text(mmdit, t5, 2, 32, 16, vqa["predictions"])


_ANCHOR_WITH_CPU_ATTENTION_FLOPS = '''
import runpy, sys
import torch
from torch.utils import flop_counter as fc
aten = torch.ops.aten

@fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

@fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.mark.slow
def test_train_flops_equal_torch_flop_counter_of_the_anchor(tmp_path):
    anchor = BENCH_DIR / "torch_anchor.py"
    if not anchor.exists():
        pytest.skip(f"{anchor} not present")
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(BENCH_DIR))
    try:
        from ref_ddit import TINY
    finally:
        sys.path.remove(str(BENCH_DIR))
    wrapper = tmp_path / "anchor_flops.py"
    wrapper.write_text(_ANCHOR_WITH_CPU_ATTENTION_FLOPS)
    batch = 2
    proc = subprocess.run([sys.executable, str(wrapper), str(anchor), "--tiny", "--what", "train", "--batch",
                           str(batch), "--iters", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch_flops = json.loads(proc.stdout.strip().splitlines()[-1])["flops_per_step"]
    # The anchor's --tiny setup: ref_ddit.TINY, vocab 64, 32x32 latents, 16 tokens, this T5.
    mmdit = mmdit_from_diffusers(TINY, vocab_size=64)
    t5 = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    assert flops.train_step(mmdit, t5, batch, latent_side=32, text_tokens=16) == torch_flops


def test_train_flops_reproduce_the_anchor_h100_figure():
    # /work/shared/bench/README.md: 67.7 TFLOP/step (16.9 per sample) at batch 4, 512 px, 256 tokens,
    # the anchor's vocabulary of 32128 in the text head.
    total = flops.train_step(MMDiTConfig(vocab_size=32128), T5Config(), 4, latent_side=64, text_tokens=256)
    assert round(total / 1e12, 1) == 67.7 and round(total / 4e12, 1) == 16.9


def test_backward_counts_and_the_rule_of_thumb():
    cfg, t5 = MMDiTConfig(vocab_size=32128), T5Config()
    parts = flops.mmdit_forward_parts(cfg, 4, 1024, 256)
    assert sum(parts.values()) == flops.mmdit_forward(cfg, 4, 1024, 256)
    # Both halves differ from "3x forward" exactly by the constant-input, dead and attention terms.
    for half in ("image", "text"):
        factors = flops.BACKWARD_FACTORS[half]
        diff = 3 * sum(parts.values()) - flops.mmdit_forward_backward(cfg, 4, 1024, 256, half)
        assert diff == sum(v * (2 - factors[k]) for k, v in parts.items())
    naive = flops.naive_train_step(cfg, t5, 4, 64, 256)
    assert abs(flops.train_step(cfg, t5, 4, 64, 256) / naive - 1) < 0.01
    # Linear parts scale with the batch; attention with the square of the sequence.
    one, two = flops.mmdit_forward_parts(cfg, 1, 1024, 256), flops.mmdit_forward_parts(cfg, 2, 1024, 256)
    assert all(two[k] == 2 * one[k] for k in one)
    assert flops.attention(1, 24, 2560, 2560, 64) == 4 * flops.attention(1, 24, 1280, 1280, 64)


def test_bench_config_feeds_latents_and_resolves_sizes():
    c, side, length = benchmark.bench_config(stage2.get_config())
    assert (side, length) == (64, 256) and c.model.latent_space == "pixels"
    assert c.model.transformer.sample_size == 64 and benchmark.special_ids(c) == (32099, 1)
    c, side, length = benchmark.bench_config(stage2.get_config(), image_size=256, text_length=64)
    assert (side, length, c.model.transformer.sample_size) == (32, 64, 32)
    with pytest.raises(ValueError, match="not divisible"):
        benchmark.bench_config(stage2.get_config(), image_size=260)


def test_flag_parsing_names_bad_values():
    assert benchmark.parse_whats("train, t2i") == ["train", "t2i"]
    with pytest.raises(ValueError, match="'bogus'"):
        benchmark.parse_whats("train,bogus")
    assert benchmark.parse_batches("", "caption") == (1, 8)
    assert benchmark.parse_batches("2,4", "train") == (2, 4)
    with pytest.raises(ValueError, match="--batch='0'"):
        benchmark.parse_batches("0", "train")


def test_text_cache_window_flops_and_sampler_names():
    """A window covering the whole row costs what the image cache's text-only call costs (T5 in full and the
    MM-DiT's text stream); a quarter window cuts T5's 4x; +textcache parses for block samplers only."""
    c, side, length = benchmark.bench_config(stage2.get_config(), image_size=512, text_length=128)
    mmdit, t5 = MMDiTConfig.from_dict(c.model.transformer.to_dict()), T5Config.from_dict(c.model.text_encoder.to_dict())
    assert flops.text_prediction(mmdit, t5, 2, side, length, window=length) == flops.text_prediction(
        mmdit, t5, 2, side, length, image_cached=True)
    assert 4 * flops.t5_forward(t5, 2, 128, window=32) == flops.t5_forward(t5, 2, 128)  # all per query, keys 128
    full, window = flops.text_prediction(mmdit, t5, 1, side, 128), flops.text_prediction(mmdit, t5, 1, side, 128,
                                                                                           window=32)
    assert 8 < full / window < 9  # SD3-medium + T5-XXL at 512 px (README, Benchmark)
    decoders = benchmark.parse_samplers("ancestral,threshold+cache,semi_ar+textcache", image_cache=3)
    assert [(d.name, d.image_cache, d.text_cache) for d in decoders] == [
        ("ancestral", None, False), ("threshold+cache", 3, False), ("semi_ar+textcache", 3, True)]
    with pytest.raises(ValueError, match="'ancestral\\+textcache'"):
        benchmark.parse_samplers("ancestral+textcache")
