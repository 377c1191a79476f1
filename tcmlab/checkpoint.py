"""Checkpoints: one safetensors file per save, holding every tensor, with the JSON state (config, step, optimiser
hyper-parameters, ...) in the file's metadata. Never pickled code.

Writes are atomic: the file is written under a temporary name in the same folder, flushed, then `os.replace`d over
the old one, so an interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

TENSOR_TAG = "__tensor__"


def flatten(obj, prefix: str, tensors: dict[str, torch.Tensor]):
    """Split a nested structure into tensors (stored by path) and a JSON-able skeleton that points to them."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {TENSOR_TAG: prefix}
    if isinstance(obj, dict):
        if any(not isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"cannot checkpoint dict keys of {prefix!r}: {list(obj)[:3]}")
        return {"__dict__": [[k, flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {prefix!r}")


def unflatten(skel, tensors: dict[str, torch.Tensor]):
    if isinstance(skel, dict):
        if TENSOR_TAG in skel:
            return tensors[skel[TENSOR_TAG]]
        if "__dict__" in skel:
            return {k: unflatten(v, tensors) for k, v in skel["__dict__"]}
        if "__list__" in skel:
            return [unflatten(v, tensors) for v in skel["__list__"]]
    return skel


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def save(path: str | Path, state: dict) -> None:
    """Atomically save a nested dict of tensors and plain values to one safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, "s", tensors)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"tcmlab": json.dumps(skeleton)})
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: str | Path, device="cpu") -> dict:
    """Load a checkpoint written by `save`; a missing or damaged file raises an error that says what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: give a run directory that holds latest.safetensors, "
                                f"or train the previous stage first")
    try:
        tensors = load_file(str(path), device=str(device))
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as fh:
            skeleton = json.loads((fh.metadata() or {})["tcmlab"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
        raise ValueError(f"checkpoint {path} is damaged or not a tcmlab checkpoint ({e}). Restore it from a copy, "
                         f"or delete it to restart that stage from step 0 (nothing else in the run is touched).")
    return unflatten(skeleton, tensors)
