"""diffusers SD3 / D-DiT folder -> dual_diffusion checkpoint (Orbax + JSON), streamed tensor by tensor.

The source's folders are found by class name (layout.py): SD3's text_encoder_3/ and the release's
text_encoder/ both hold the T5 encoder.
Each component is checked completely before anything is written: every
parameter of our network has a source tensor (or is listed as new), every
source tensor is used (or listed as dropped), shapes match. Then tensors are
read one at a time from memory-mapped safetensors, permuted by their key-map
rule and written into preallocated np.memmap files in DST/.scratch, which Orbax
saves with a bounded number of bytes in flight; resident memory stays near the
largest single tensor. Without --dtype each tensor keeps its source dtype, so
the export back to diffusers (export.py) is bit-exact.
"""
from __future__ import annotations

import collections
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from dual_diffusion.convert import components as comp
from dual_diffusion.convert.keymap import Rule
from dual_diffusion.convert.layout import ConversionError, Layout, check_destination, resolve
from dual_diffusion.convert.mmdit_keys import mmdit_rules, sd3_init_plan
from dual_diffusion.convert.safetensors_io import SafetensorsFile, TensorSource
from dual_diffusion.models import configs as C

INIT_SEED = 0  # seed of the random init that parameters new in a plain-SD3 conversion come from
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jax.numpy.bfloat16)}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


class _Plan:
    """How one component's tensors are produced: rules over present source keys, new and dropped keys."""

    def __init__(self, component: comp.Component, folder: Path, cfg, source: TensorSource, rules: list[Rule],
                 new_targets=(), dropped_sources=()):
        self.component, self.folder, self.cfg, self.source = component, folder, cfg, source
        self.rules, self.new_targets, self.dropped = list(rules), list(new_targets), list(dropped_sources)
        self.variables = comp.flat_variables(component.build_abstract(cfg))
        self._check()

    def _check(self) -> None:
        where = f"{self.folder.name} ({self.source.description})"
        targets = [r.target for r in self.rules] + list(self.new_targets)
        dup = [comp.path_name(t) for t, n in collections.Counter(targets).items() if n > 1]
        uncovered = [comp.path_name(p) for p in self.variables if p not in set(targets)]
        unknown = [comp.path_name(t) for t in targets if t not in self.variables]
        if dup or uncovered or unknown:  # a key-map bug, not a bad file; still named precisely
            raise ConversionError(f"{where}: key map does not match the network: duplicated targets {dup}, "
                                  f"parameters without a rule {uncovered}, targets not in the network {unknown}")
        self.present: dict[Rule, list[str]] = {}
        missing, used = [], set(self.dropped)
        for rule in self.rules:
            keys = [k for k in (rule.source,) + rule.aliases if k in self.source]
            if not keys:
                missing.append(rule.source)
                continue
            self.present[rule] = keys
            used.update(keys)
            expected = rule.torch_shape(self.variables[rule.target].get_value().shape)
            for key in keys:
                if tuple(self.source.shape(key)) != expected:
                    raise ConversionError(f"{where}: tensor {key!r} has shape {list(self.source.shape(key))}; "
                                          f"expected {list(expected)} for {comp.path_name(rule.target)}")
        if missing:
            raise ConversionError(f"{where}: missing key(s) {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
        unexpected = sorted(set(self.source) - used)
        if unexpected:
            raise ConversionError(f"{where}: unexpected key(s) {unexpected[:10]}"
                                  + (" ..." if len(unexpected) > 10 else "") + " match no parameter")
        absent_drops = [k for k in self.dropped if k not in self.source]
        if absent_drops:
            raise ConversionError(f"{where}: key map drops {absent_drops} which the file does not hold")

    def default_dtype(self) -> np.dtype:
        """The most common floating source dtype (new parameters are stored in it)."""
        counts = collections.Counter(np.dtype(self.source.dtype(k)) for keys in self.present.values() for k in keys[:1])
        floats = [(n, d) for d, n in counts.items() if np.issubdtype(d, np.floating) or d.name == "bfloat16"]
        return max(floats, key=lambda nd: nd[0])[1] if floats else np.dtype(np.float32)

    def tensor_count(self) -> int:
        return len(self.rules) + len(self.new_targets)


def _transformer_plan(folder: Path, vocab_size: int) -> _Plan:
    component = comp.COMPONENTS["transformer"]
    config = _read_json(folder / "config.json")
    source = TensorSource.from_folder(folder, component.stem)
    is_ddit = "text_proj_out.weight" in source  # a D-DiT release: its text head fixes the vocabulary
    try:
        cfg = C.mmdit_from_diffusers(config, int(source.shape("text_proj_out.weight")[0]) if is_ddit else vocab_size)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{folder / 'config.json'}: {e}") from None
    if is_ddit:
        if vocab_size > cfg.vocab_size:
            raise ConversionError(f"{folder}: text_proj_out has {cfg.vocab_size} rows but the tokenizer has "
                                  f"{vocab_size} ids")
        return _Plan(component, folder, cfg, source, mmdit_rules(cfg))
    try:  # plain SD3: a D-DiT initialisation
        rules, new, dropped = sd3_init_plan(cfg, list(source))
    except ValueError as e:
        raise ConversionError(f"{folder} (plain SD3 transformer, no text_proj_out): {e}") from None
    return _Plan(component, folder, cfg, source, rules, new, dropped)


def _simple_plan(folder: Path, name: str, parse: Callable[[dict], object]) -> _Plan:
    component = comp.COMPONENTS[name]
    try:
        cfg = parse(_read_json(folder / "config.json"))
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{folder / 'config.json'}: {e}") from None
    source = TensorSource.from_folder(folder, component.stem)
    return _Plan(component, folder, cfg, source, component.key_rules(cfg))


def load_mask_embedding(path: Path, d_model: int) -> np.ndarray:
    """(d_model,) float32 row from .safetensors (one tensor), .npy (no pickles) or .pth (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"mask embedding {path}: no such file")
    if path.suffix == ".safetensors":
        f = SafetensorsFile(path)
        if len(f.keys()) != 1:
            raise ConversionError(f"mask embedding {path}: expected exactly one tensor, found {f.keys()}")
        array = np.asarray(f.get(f.keys()[0]))
    elif path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ConversionError(f"mask embedding {path}: not a plain .npy array ({e})") from None
    elif path.suffix in (".pth", ".pt", ".bin"):
        import pickle

        import torch  # only for this file type; never unpickles arbitrary objects

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise ConversionError(f"mask embedding {path}: refused, not loadable with weights_only=True "
                                  f"(only plain tensors are accepted): {str(e).splitlines()[0]}") from None
        if isinstance(obj, dict) and len(obj) == 1:
            obj = next(iter(obj.values()))
        if not isinstance(obj, torch.Tensor):
            raise ConversionError(f"mask embedding {path}: holds {type(obj).__name__}, expected one tensor")
        array = obj.detach().float().numpy()
    else:
        raise ConversionError(f"mask embedding {path}: unsupported file type {path.suffix!r} "
                              "(use .safetensors, .npy or .pth)")
    if array.shape not in ((d_model,), (1, d_model)):
        raise ConversionError(f"mask embedding {path}: shape {list(array.shape)}; expected [{d_model}] or "
                              f"[1, {d_model}] (T5 d_model)")
    return array.reshape(d_model)


def _new_params(plan: _Plan) -> list[np.ndarray]:
    """Values of the new parameters from our network's own init (seed INIT_SEED); jit drops the rest."""
    from flax import nnx

    cls, targets = plan.component.build_cls(), plan.new_targets

    @jax.jit
    def init():
        flat = comp.flat_variables(cls(plan.cfg, C.Runtime(), rngs=nnx.Rngs(INIT_SEED)))
        return [flat[t].get_value() for t in targets]

    return [np.asarray(a) for a in init()]


def _write_component(plan: _Plan, dst: Path, dtype: np.dtype | None, bar: tqdm,
                     edit: Callable[[Path_, np.ndarray], None] | None = None) -> dict:
    """Streams one component into scratch memmaps, saves it with Orbax, returns its JSON record."""
    scratch = dst / ".scratch" / plan.component.name
    scratch.mkdir(parents=True, exist_ok=True)
    new_dtype = dtype or plan.default_dtype()
    arrays, source_dtypes = {}, {}

    def alloc(i, target, dt):
        shape = plan.variables[target].get_value().shape
        arrays[target] = np.lib.format.open_memmap(scratch / f"{i}.npy", mode="w+", dtype=dt, shape=shape)
        return arrays[target]

    for i, rule in enumerate(plan.rules):
        keys = plan.present[rule]
        bar.set_postfix_str(keys[0][-40:])
        value = plan.source[keys[0]]
        for alias in keys[1:]:  # tied copies must agree, or one of them would be silently lost
            if not np.array_equal(plan.source[alias], value):
                raise ConversionError(f"{plan.folder.name}: tied tensors {keys[0]!r} and {alias!r} differ")
        source_dtypes[comp.path_name(rule.target)] = np.dtype(value.dtype).name
        out = alloc(i, rule.target, dtype or value.dtype)
        out[...] = rule.to_ours(np.asarray(value)).astype(out.dtype, copy=False)
        bar.update(1)
    for j, (target, value) in enumerate(zip(plan.new_targets, _new_params(plan) if plan.new_targets else [])):
        alloc(len(plan.rules) + j, target, new_dtype)[...] = value.astype(new_dtype)
        bar.update(1)
    if edit is not None:
        edit(arrays)
    for a in arrays.values():
        a.flush()
    comp.save_flat(dst / comp.PARAMS_DIR / plan.component.name, arrays)
    record = {
        "config": plan.cfg.to_dict(),
        "source": plan.source.description,
        "source_dtypes": source_dtypes,
        "stored_dtypes": {comp.path_name(p): np.dtype(a.dtype).name for p, a in arrays.items()},
        # which of a rule's names the file used, so the export writes the same keys back
        "source_keys": sorted(k for keys in plan.present.values() for k in keys),
        "new_params": [comp.path_name(t) for t in plan.new_targets],
        "dropped_sources": sorted(plan.dropped),
    }
    del arrays
    shutil.rmtree(scratch)
    return record


Path_ = comp.Path_


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _mask_record(layout: Layout, transformer: _Plan, mask_embedding, mask_id: int) -> dict:
    """Where T5's row of the mask token <extra_id_0> comes from; "unaligned" for a plain SD3 source."""
    if mask_embedding:
        row, source = "replaced", str(Path(mask_embedding).absolute())
    elif transformer.new_targets:  # plain SD3: its T5 never saw the mask token as D-DiT uses it
        row, source = "unaligned", f"{layout.folders['text_encoder']}/ (T5's pretrained row)"
    else:  # a D-DiT transformer next to the T5 it was trained with
        row, source = "source", f"{layout.folders['text_encoder']}/ (the source's own row)"
    return {"row": row, "source": source, "token": "<extra_id_0>", "id": mask_id}


def pad_token_record(tok_folder: Path, tokenizer) -> dict:
    """The pad token the tokenizer folder declares (the release pads prompts with it), its id and source."""
    from dual_diffusion.tokenizer import declared_pad_token

    try:
        token, source = declared_pad_token(tok_folder)
        return {"pad_token": token, "pad_id": tokenizer.token_id(token), "pad_token_from": source}
    except ValueError as e:
        raise ConversionError(f"{tok_folder}: the declared pad token: {e}") from None


def convert(src: str | Path, dst: str | Path, dtype: str | None = None, mask_embedding: str | Path | None = None,
            progress: bool = True, log: Callable[[str], None] = print,
            warn: Callable[[str], None] = _warn) -> dict:
    """Converts a diffusers folder into a dual_diffusion checkpoint at dst; returns the JSON record.

    dst must be absent or an empty folder. dtype: None keeps every tensor's source dtype (exact
    export); "float32" / "bfloat16" casts. log receives the line naming the folders used, warn the
    warnings (default: stdout, and stderr with a "warning: " prefix).
    """
    from dual_diffusion.tokenizer import Tokenizer

    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    out_dtype = DTYPES[dtype] if dtype else None
    check_destination(dst)
    layout = resolve(src)
    log(layout.describe())
    tok_folder = layout.path("tokenizer")
    if not (tok_folder / "spiece.model").is_file():
        raise ConversionError(f"{tok_folder}: no spiece.model (T5's SentencePiece model, which the converter reads; "
                              "a tokenizer.json alone is not enough: SD3's tokenizer_3/ has the same file)")
    tokenizer = Tokenizer(tok_folder / "spiece.model")
    pad_record = pad_token_record(tok_folder, tokenizer)
    plans = {"transformer": _transformer_plan(layout.path("transformer"), tokenizer.vocab_size),
             "text_encoder": _simple_plan(layout.path("text_encoder"), "text_encoder", C.t5_from_transformers),
             "vae": _simple_plan(layout.path("vae"), "vae", C.vae_from_diffusers)}
    t5 = plans["text_encoder"].cfg
    if tokenizer.vocab_size > t5.vocab_size:
        raise ConversionError(f"{tok_folder}: tokenizer has {tokenizer.vocab_size} ids but the text encoder's "
                              f"embedding has {t5.vocab_size} rows")
    mask_row = load_mask_embedding(mask_embedding, t5.d_model) if mask_embedding else None
    mask_record = _mask_record(layout, plans["transformer"], mask_embedding, tokenizer.mask_id)
    if mask_record["row"] == "unaligned":
        warn(f"{src} holds a plain SD3 transformer and --mask-embedding was not given: T5's row "
             f"{tokenizer.mask_id} (<extra_id_0>, the mask token) keeps T5's pretrained value, not the aligned "
             "embedding the D-DiT release trains with (its aligned_t5_mask_emb file); pass --mask-embedding FILE "
             f"to replace it. Recorded as mask_embedding.row = \"unaligned\" in {dst / comp.INFO_FILE}.")
    created = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)

    def set_mask_row(arrays):
        rule = next(r for r in plans["text_encoder"].rules if r.source == "shared.weight")
        arrays[rule.target][tokenizer.mask_id] = mask_row.astype(arrays[rule.target].dtype)

    index = layout.root / "model_index.json"
    info = {"format": comp.FORMAT, "version": comp.FORMAT_VERSION, "source": str(src.absolute()),
            "dtype": dtype or "source", "init_seed": INIT_SEED,
            "model_index": json.loads(index.read_text()) if layout.found_by == index.name else None,
            "layout": layout.record(),
            "tokenizer": {"folder": comp.TOKENIZER_DIR, "model_file": "spiece.model",
                          "vocab_size": tokenizer.vocab_size, "mask_id": tokenizer.mask_id, **pad_record},
            "mask_embedding": mask_record,
            "components": {}}
    total = sum(p.tensor_count() for p in plans.values())
    try:
        with tqdm(total=total, desc="converting", unit="tensor", disable=not progress) as bar:
            for name, plan in plans.items():
                edit = set_mask_row if name == "text_encoder" and mask_row is not None else None
                info["components"][name] = _write_component(plan, dst, out_dtype, bar, edit)
        shutil.copytree(tok_folder, dst / comp.TOKENIZER_DIR, dirs_exist_ok=True)
        (dst / comp.INFO_FILE).write_text(json.dumps(info, indent=1))
    except BaseException:  # no half-written checkpoint is left behind
        if created:
            shutil.rmtree(dst, ignore_errors=True)
        else:
            for name in (comp.PARAMS_DIR, comp.TOKENIZER_DIR, ".scratch"):
                shutil.rmtree(dst / name, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(dst / ".scratch", ignore_errors=True)
    return info
