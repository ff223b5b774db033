"""Public base models read from a local diffusers folder: checks and content hashes.

A pipeline folder (``save_pretrained`` of a diffusers pipeline, e.g. Wan2.1-T2V-1.3B-Diffusers)
holds ``model_index.json`` and one sub-folder per component. Before anything is built from it,
`check_pipeline_folder` says in one line what is wrong with a folder that cannot work — another
model class, a missing sub-folder, a half-downloaded safetensors file — naming the file and
what was expected, instead of a traceback from deep inside diffusers.

`folder_sha256` fingerprints a component folder by its bytes (configs, tokenizer files and
weights), so an export that records a folder's path can refuse a folder whose contents changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sora_train.utils.errors import SoraError
from sora_train.utils.io import sha256_file

# Files whose bytes define a component (weights, configs, tokenizer files); others (README,
# .gitattributes, download caches) do not change what the model computes.
HASHED_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".bin")


def check_safetensors(path: str | os.PathLike) -> Path:
    """``path`` if it is a complete safetensors file (header readable, every tensor's bytes
    present); a SoraError naming it otherwise. Reads the header only."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise ValueError("header length")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        raise SoraError(f"{path}: not a complete safetensors file (truncated or not safetensors); download it again") from None
    if 8 + n + end > size:
        raise SoraError(f"{path}: truncated safetensors file ({size} bytes, the header promises {8 + n + end}); "
                        "the download did not finish, fetch it again") from None
    return path


def check_component(folder: str | os.PathLike, expected_classes: tuple[str, ...] = (), what: str = "component") -> Path:
    """A component sub-folder: exists, its config.json names one of ``expected_classes``
    (``_class_name`` for diffusers, ``architectures``/``model_type`` for transformers; a
    tokenizer folder has no config.json), and every safetensors file in it is complete."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SoraError(f"{folder}: missing {what} folder (expected a diffusers pipeline folder with {folder.name}/)")
    cfg_file = folder / "config.json"
    if expected_classes:
        if not cfg_file.is_file():
            raise SoraError(f"{cfg_file}: missing; expected the config of a {' or '.join(expected_classes)}")
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise SoraError(f"{cfg_file}: not valid JSON ({e})") from None
        names = {cfg.get("_class_name"), cfg.get("model_type"), *(cfg.get("architectures") or [])}
        if not names & set(expected_classes):
            found = cfg.get("_class_name") or (cfg.get("architectures") or [cfg.get("model_type")])[0]
            raise SoraError(f"{cfg_file}: a {found!r}, expected {' or '.join(expected_classes)} ({what})")
    weights = sorted(folder.glob("*.safetensors"))
    if expected_classes and not weights:
        # Only safetensors are read: a *.bin is a pickle, and nothing a user hands us is unpickled.
        found = "only pickled *.bin weights" if list(folder.glob("*.bin")) else "no weights"
        raise SoraError(f"{folder}: {found} in the {what} folder; expected *.safetensors (convert them, or download the safetensors files)")
    for w in weights:
        check_safetensors(w)
    return folder


def check_pipeline_folder(path: str | os.PathLike, pipeline_classes: tuple[str, ...], components: dict[str, tuple[str, ...]]) -> Path:
    """The root of a diffusers pipeline folder of one of ``pipeline_classes`` with every
    component of ``components`` (sub-folder -> accepted classes; () = no config to check)."""
    root = Path(path).expanduser()
    index = root / "model_index.json"
    if not root.is_dir():
        raise SoraError(f"{root}: not a folder (expected a local diffusers {pipeline_classes[0]} folder)")
    if not index.is_file():
        raise SoraError(f"{index}: missing; expected a diffusers {pipeline_classes[0]} folder (save_pretrained / a hub snapshot)")
    try:
        cls = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise SoraError(f"{index}: not valid JSON ({e})") from None
    if cls not in pipeline_classes:
        raise SoraError(f"{index}: a {cls!r} folder, expected {' or '.join(pipeline_classes)}")
    for sub, classes in components.items():
        check_component(root / sub, classes, what=sub)
    return root


def folder_sha256(folder: str | os.PathLike) -> str:
    """sha256 over (relative name, sha256 of bytes) of a folder's defining files, in name order.

    Reads every weight byte: seconds per GB; callers compute it once and keep it."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in HASHED_SUFFIXES and not p.name.startswith(".")):
        h.update(f"{f.relative_to(folder).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def check_folder_hash(folder: str | os.PathLike, expected: str | None, what: str) -> str:
    """The folder's sha256; a SoraError when ``expected`` is given and differs."""
    got = folder_sha256(folder)
    if expected and got != expected:
        raise SoraError(f"{folder}: its contents changed since the export was written ({what} sha256 {got[:12]}…, "
                        f"the export recorded {expected[:12]}…); point it at the folder the model was trained with")
    return got


__all__ = ["check_component", "check_folder_hash", "check_pipeline_folder", "check_safetensors", "folder_sha256"]
