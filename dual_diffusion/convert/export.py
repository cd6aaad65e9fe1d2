"""dual_diffusion checkpoint -> diffusers folder (D-DiT layout) that PyTorch colleagues can load.

Writes transformer/ (D-DiT layout + config.json), vae/, text_encoder_3/
(T5EncoderModel), tokenizer_3/ and model_index.json. Each tensor is permuted
back by its key-map rule and written in its stored dtype (or --dtype), one at a
time; a checkpoint converted without --dtype therefore exports bit for bit
what it was converted from.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dual_diffusion.convert import components as comp
from dual_diffusion.convert.layout import check_destination
from dual_diffusion.convert.safetensors_io import write_safetensors

DEFAULT_SHARD_BYTES = 10 * 2**30  # diffusers' default max_shard_size


def _shards(entries: list, max_bytes: int) -> list[list]:
    """Greedy split of (key, dtype, shape, produce) entries into files of at most max_bytes (one tensor min)."""
    shards, size = [[]], 0
    for entry in entries:
        nbytes = int(np.prod(entry[2])) * np.dtype(entry[1]).itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _write_weights(folder: Path, stem: str, entries: list, max_bytes: int, bar: tqdm) -> None:
    def counted(produce):
        def run():
            out = produce()
            bar.update(1)
            return out
        return run

    entries = [(k, d, s, counted(p)) for k, d, s, p in entries]
    shards = _shards(entries, max_bytes)
    metadata = {"format": "pt"}  # what transformers / diffusers expect of torch-layout files
    if len(shards) == 1:
        write_safetensors(folder / f"{stem}.safetensors", shards[0], metadata)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / name, shard, metadata)
        for key, dtype, shape, _ in shard:
            weight_map[key] = name
            total += int(np.prod(shape)) * np.dtype(dtype).itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_component(src: Path, info: dict, name: str, out: Path, dtype: str | None, max_bytes: int,
                     bar: tqdm) -> None:
    component = comp.COMPONENTS[name]
    record = info["components"][name]
    cfg = component.config_cls.from_dict(record["config"])
    rules = component.key_rules(cfg)
    arrays = comp.restore_numpy(src / comp.PARAMS_DIR / name, [r.target for r in rules])
    wanted = set(record.get("source_keys") or ())
    entries = []
    for rule in rules:
        # Write the names the source used (e.g. both names of a tied weight); our canonical name otherwise.
        keys = [k for k in (rule.source,) + rule.aliases if k in wanted] or [rule.source]
        array = arrays[rule.target]
        out_dtype = np.dtype(dtype) if dtype else array.dtype
        shape = rule.torch_shape(array.shape)
        for key in keys:
            entries.append((key, out_dtype, shape,
                            lambda r=rule, a=array, d=out_dtype: r.to_torch(a).astype(d, copy=False)))
    bar.total += len(entries)
    bar.refresh()
    folder = out / component.subfolder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(component.to_source_config(cfg), indent=2))
    _write_weights(folder, component.stem, sorted(entries, key=lambda e: e[0]), max_bytes, bar)


def export_to_diffusers(src: str | Path, dst: str | Path, dtype: str | None = None,
                        max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> None:
    """Exports the converted checkpoint at src into a diffusers folder at dst (must not exist or be empty)."""
    src, dst = Path(src), Path(dst)
    check_destination(dst, "export destination")
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint folder {src} does not exist")
    info = comp.read_info(src)
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {dtype!r}: expected float32, bfloat16 or float16")
    if dtype == "bfloat16":
        import ml_dtypes

        dtype = ml_dtypes.bfloat16
    dst.mkdir(parents=True, exist_ok=True)
    with tqdm(total=0, desc="exporting", unit="tensor", disable=not progress) as bar:
        for name in comp.COMPONENTS:
            if name in info["components"]:
                export_component(src, info, name, dst, dtype, max_shard_bytes, bar)
    shutil.copytree(src / comp.TOKENIZER_DIR, dst / "tokenizer_3", dirs_exist_ok=True)
    model_index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1"}
    for name, component in comp.COMPONENTS.items():
        if name in info["components"]:
            model_index[component.subfolder] = list(component.library)
    model_index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    (dst / "model_index.json").write_text(json.dumps(model_index, indent=2))
