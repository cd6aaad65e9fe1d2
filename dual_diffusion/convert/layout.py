"""Which subfolder of a diffusers folder holds which network, found by class name, not by folder name.

Two layouts occur, and both convert:
  SD3 / SD3.5 (StableDiffusion3Pipeline): transformer/ (SD3Transformer2DModel), vae/, text_encoder_3/
      (T5EncoderModel), tokenizer_3/ (T5TokenizerFast); text_encoder/ and text_encoder_2/ are CLIP, unused.
  D-DiT release (DualDiffSD3Pipeline): transformer/ (SD3JointModelFlexible), vae/, text_encoder/
      (T5EncoderModel), tokenizer/ (T5TokenizerFast), scheduler/; no CLIP.
With a model_index.json its entries ({"name": [library, class]}) give each folder's class; without one,
each subfolder's config.json (`_class_name` or `architectures[0]`; a tokenizer's tokenizer_config.json
`tokenizer_class`, or its spiece.model) does. Exactly one folder per role must match.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

ROLES = ("transformer", "text_encoder", "vae", "tokenizer")
EXPECTED = {"transformer": "SD3Transformer2DModel, SD3JointModelFlexible or another *Transformer* class",
            "text_encoder": "T5EncoderModel", "vae": "AutoencoderKL", "tokenizer": "T5Tokenizer or T5TokenizerFast"}
# The release's transformer class (sd3_modules/sd3_model.py, a subclass of SD3Transformer2DModel); its
# name lacks "Transformer", so it is listed.
RELEASE_TRANSFORMERS = ("SD3JointModelFlexible",)
INDEX_FILE = "model_index.json"


class ConversionError(ValueError):
    """A source folder that does not convert exactly; the message names the key / path / shape."""


def role_of(class_name: str) -> str | None:
    """The role a class plays for the converter, or None (CLIP, schedulers, ... are not used)."""
    if class_name == "T5EncoderModel":
        return "text_encoder"
    if class_name in ("T5Tokenizer", "T5TokenizerFast"):
        return "tokenizer"
    if class_name == "AutoencoderKL":
        return "vae"
    if "CLIP" in class_name or class_name.startswith("T5"):
        return None
    if "Transformer" in class_name or class_name in RELEASE_TRANSFORMERS:
        return "transformer"
    return None


@dataclasses.dataclass(frozen=True)
class Layout:
    """role -> (subfolder, class); found_by is INDEX_FILE or "config.json" (inferred)."""

    root: Path
    found_by: str
    folders: dict[str, str]
    classes: dict[str, str]
    evidence: dict[str, str]   # role -> where the class was read (inferred layouts)
    unused: dict[str, str]     # subfolder -> class, for entries no role took

    def path(self, role: str) -> Path:
        return self.root / self.folders[role]

    def describe(self) -> str:
        """One line naming each component's folder and class (and, when inferred, where it was read)."""
        parts = []
        for role in ROLES:
            why = f", {self.evidence[role]}" if self.evidence.get(role) else ""
            parts.append(f"{role} = {self.folders[role]}/ ({self.classes[role]}{why})")
        unused = ", ".join(f"{k}/ ({v})" for k, v in sorted(self.unused.items()))
        head = (f"components of {self.root} (from {INDEX_FILE})" if self.found_by == INDEX_FILE else
                f"no {INDEX_FILE} in {self.root}; inferred from each subfolder's config")
        return f"{head}: " + "; ".join(parts) + (f"; not used: {unused}" if unused else "")

    def record(self) -> dict:
        """JSON record for dual_diffusion.json."""
        return {"found_by": self.found_by, "unused": dict(sorted(self.unused.items())),
                "components": {r: {"folder": self.folders[r], "class": self.classes[r],
                                   **({"evidence": self.evidence[r]} if self.evidence.get(r) else {})}
                               for r in ROLES}}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def config_class(folder: Path) -> tuple[str, str] | None:
    """(class, evidence) of one subfolder from its config files, or None when they name no class."""
    config = folder / "config.json"
    if config.is_file():
        data = _read_json(config)
        if isinstance(data.get("_class_name"), str):
            return data["_class_name"], "config.json _class_name"
        arch = data.get("architectures")
        if isinstance(arch, list) and arch and isinstance(arch[0], str):
            return arch[0], "config.json architectures"
        return None
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file():
        name = _read_json(tok_config).get("tokenizer_class")
        if isinstance(name, str):
            return name, "tokenizer_config.json tokenizer_class"
    if (folder / "spiece.model").is_file():
        return "T5Tokenizer", "spiece.model"
    return None


def _choose(root: Path, where: str, found_by: str, candidates: dict[str, list[tuple[str, str, str]]],
            unused: dict[str, str]) -> Layout:
    problems = []
    for role in ROLES:
        found = candidates[role]
        if not found:
            problems.append(f"no {role} (expected {EXPECTED[role]})")
        elif len(found) > 1:
            listed = ", ".join(f"{f}/ ({c})" for f, c, _ in found)
            problems.append(f"{len(found)} candidates for the {role}: {listed}; expected exactly one")
    if problems:
        raise ConversionError(f"{where}: " + "; ".join(problems))
    pick = {role: candidates[role][0] for role in ROLES}
    return Layout(root, found_by, {r: p[0] for r, p in pick.items()}, {r: p[1] for r, p in pick.items()},
                  {r: p[2] for r, p in pick.items() if p[2]}, unused)


def _from_index(root: Path) -> Layout:
    index_file = root / INDEX_FILE
    index = _read_json(index_file)
    candidates: dict[str, list] = {role: [] for role in ROLES}
    unused = {}
    for name, entry in index.items():
        if name.startswith("_") or not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)):
            continue  # metadata, or a component the pipeline left empty ([null, null])
        role = role_of(entry[1])
        if role is None:
            unused[name] = entry[1]
        else:
            candidates[role].append((name, entry[1], ""))
    layout = _choose(root, str(index_file), INDEX_FILE, candidates, unused)
    for role in ROLES:
        if not layout.path(role).is_dir():
            raise ConversionError(f"{root}: missing the {layout.folders[role]}/ folder ({layout.classes[role]}, "
                                  f"the {role} named in {INDEX_FILE})")
    for role in ROLES:
        folder = layout.path(role)
        found = config_class(folder)
        if found is not None and role_of(found[0]) != role:  # the index and the folder disagree
            raise ConversionError(f"{folder}: its {found[1]} says {found[0]!r}, but {INDEX_FILE} names it as the "
                                  f"{role} ({layout.classes[role]}); expected {EXPECTED[role]}")
    return layout


def _inferred(root: Path) -> Layout:
    candidates: dict[str, list] = {role: [] for role in ROLES}
    unused = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        found = config_class(folder)
        if found is None:
            continue
        role = role_of(found[0])
        if role is None:
            unused[folder.name] = found[0]
        else:
            candidates[role].append((folder.name, found[0], found[1]))
    where = f"{root} (no {INDEX_FILE}; classes read from each subfolder's config.json)"
    return _choose(root, where, "config.json", candidates, unused)


def resolve(root: str | Path) -> Layout:
    """The folders of the transformer, T5 encoder, VAE and T5 tokenizer of a diffusers folder."""
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"source folder {root} does not exist")
    return _from_index(root) if (root / INDEX_FILE).is_file() else _inferred(root)


def check_destination(dst: str | Path, what: str = "destination") -> None:
    """An output folder must be absent or an empty folder; `what` names it in the message (e.g. --dst)."""
    dst = Path(dst)
    if dst.is_dir():
        entries = sorted(p.name for p in dst.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ConversionError(f"{what} {dst} is not empty (holds {shown}); "
                                  "expected an empty or absent folder")
    elif dst.exists() or dst.is_symlink():
        raise ConversionError(f"{what} {dst} is a file, not a folder; expected an empty or absent folder")
    else:
        parent = dst.absolute().parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ConversionError(f"{what} {dst}: {parent} is a file, not a folder; expected an empty or "
                                  "absent folder")
