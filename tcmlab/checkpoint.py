"""Checkpoints: one safetensors file per save, holding every tensor, with the JSON state (config, step, optimiser
hyper-parameters, ...) in the file's metadata. Never pickled code.

Writes are atomic: the file is written under a unique temporary name in the same folder, flushed, then
`os.replace`d over the old one, so an interrupted save leaves the previous checkpoint intact and two writers never
share a temporary file. `check_finite` refuses weights holding NaN or inf, naming the tensor.

Every save also records a checksum of each tensor's bytes (and of the JSON state) in the metadata, and `load`
recomputes them: a flipped bit (a bad disk, a damaged copy) that leaves the file readable, and finite, is refused
with the tensor it hit named (docs/decisions.md §21). Checkpoints written before checksums existed load unchecked.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

TENSOR_TAG = "__tensor__"
STATE_KEY = "tcmlab"  # metadata entry: the JSON skeleton (plain values, and where each tensor is)
SUMS_KEY = "tcmlab_checksums"  # metadata entry: {tensor name or STATE_KEY: SHA-256 hex digest}


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


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask would set it for a moment)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


TEMP_SUFFIX = ".tmp"


def temp_prefix(name: str) -> str:
    """The prefix of the temporary files an atomic write of `name` makes (`stale_temporaries` finds them)."""
    return f".{name}."


def stale_temporaries(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Temporary files of atomic writes of `names` in `folder` left behind by a process killed mid-write (SIGKILL,
    power loss): one of a checkpoint is a full-size copy. Only the writer of those names may remove them (train()
    while it holds the run lock; an evaluation writing eval.jsonl beside it keeps its own)."""
    return sorted(p for name in names for p in Path(folder).glob(temp_prefix(name) + "*" + TEMP_SUFFIX) if p.is_file())


@contextmanager
def _temp_beside(path: Path):
    """A unique temporary file name in path's folder, with the permissions a plain `open` would give (mkstemp's are
    0600, which `os.replace` would keep: collaborators sharing the folder could not read the checkpoint); removed
    unless the block moved it into place. A path that is a folder, or in a folder that does not exist, is named."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give a file name to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist (create it first)")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=TEMP_SUFFIX)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(folder: Path) -> None:
    """Raise OSError now, before hours of computation, if no file can be written in `folder`."""
    with tempfile.TemporaryFile(dir=folder):
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_files({Path(path): text.encode()})


def atomic_write_files(files: dict[Path, bytes]) -> None:
    """Write each file's bytes to a temporary file beside it (synced to disk), then rename them all into place: a
    failure while writing (a full disk) leaves every file as it was, so files written together stay a pair."""
    with ExitStack() as stack:
        temps = {}
        for path, data in files.items():
            temps[Path(path)] = tmp = stack.enter_context(_temp_beside(Path(path)))
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for path, tmp in temps.items():
            os.replace(tmp, path)


def sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def checksums(tensors: dict[str, torch.Tensor], skeleton: str) -> dict[str, str]:
    """The SHA-256 of every tensor (its dtype, shape and bytes) and of the JSON state: what `load` checks. About
    1.7 GB/s on one core (x86 with SHA extensions): ~0.7 s for a CIFAR-10 DDPM++ stage-2 checkpoint of ~1.1 GB."""
    out = {STATE_KEY: hashlib.sha256(skeleton.encode()).hexdigest()}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        out[name] = h.hexdigest()
    return out


def save(path: str | Path, state: dict) -> None:
    """Atomically save a nested dict of tensors and plain values to one safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(flatten(state, "s", tensors))
    sums = json.dumps(checksums(tensors, skeleton))
    with _temp_beside(path) as tmp:
        try:
            save_file(tensors, tmp, metadata={STATE_KEY: skeleton, SUMS_KEY: sums})
        except SafetensorError as e:  # e.g. "I/O error: No space left on device (os error 28)": an OSError of path
            code = re.search(r"os error (\d+)", str(e))
            raise OSError(int(code.group(1)) if code else errno.EIO, str(e), str(path)) from e
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes its file 0600 as well
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def header(path: str | Path) -> dict:
    """The plain (non-tensor) top-level entries of a checkpoint written by `save`, read from its header alone (no
    tensors read): step, config, init_source, ... Raises if the file cannot be read."""
    with safe_open(str(path), framework="pt") as fh:
        skeleton = json.loads((fh.metadata() or {})[STATE_KEY])
    return {k: unflatten(v, {}) for k, v in skeleton["__dict__"] if TENSOR_TAG not in json.dumps(v)}


def init_source(path: str | Path) -> dict | None:
    """What the run of a checkpoint started from: {'path', 'resolved', 'step', 'sha256'} of its init_from (train.py
    records it; 'resolved', the absolute path, since 2026-12-07), or None if it has none, or if the file is missing
    or cannot be read (loading it for training says what to do)."""
    try:
        return header(path).get("init_source") if Path(path).is_file() else None
    except (OSError, SafetensorError, ValueError, KeyError):  # damaged: training it reports that, with what to do
        return None


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights that hold NaN or inf: a damaged file or a diverged run must not be used silently."""
    for name, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise ValueError(f"{where}: tensor {name!r} holds {bad} non-finite value(s). The file is damaged or the "
                             f"run diverged: restore a copy, or train that stage again in a new run directory.")


class ChecksumError(ValueError):
    """A checkpoint whose bytes are not those that were saved."""


def _verify(saved, now: dict[str, str]) -> None:
    if not isinstance(saved, dict):
        raise ValueError(f"its {SUMS_KEY} entry is not a table of checksums")
    bad = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if bad:
        names = ["its JSON state" if k == STATE_KEY else repr(k.removeprefix("s.")) for k in bad]
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise ChecksumError(f"{', '.join(names[:3])}{more} "
                            f"{'do' if len(bad) > 1 else 'does'} not match the checksum written with it")


def load(path: str | Path, device="cpu") -> dict:
    """Load a checkpoint written by `save`, its tensors on `device` except the RNG states (always CPU); a missing or
    damaged file raises an error that says what to do."""
    return load_with_metadata(path, device)[0]


def load_with_metadata(path: str | Path, device="cpu") -> tuple[dict, dict]:
    """`load`, and what the file says of itself, read through the same handle: {'tensors': how many,
    'checksummed': whether it carries checksums (written since docs/decisions.md §21; checked if so)}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: give a run directory that holds latest.safetensors, "
                                f"or train the previous stage first")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a tcmlab checkpoint (those are .safetensors files): give a run directory, "
                         f"or the latest.safetensors inside one")
    try:
        with safe_open(str(path), framework="pt") as fh:  # one handle: a save that replaces the file meanwhile
            meta = fh.metadata() or {}                       # cannot pair one file's tensors with another's sums
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        skeleton = meta[STATE_KEY]
        if SUMS_KEY in meta:  # written since checksums exist (docs/decisions.md §21)
            _verify(json.loads(meta[SUMS_KEY]), checksums(tensors, skeleton))
        about = {"tensors": len(tensors), "checksummed": SUMS_KEY in meta}
        if torch.device(device).type != "cpu":  # RNG states stay CPU byte tensors, as torch's set_state requires
            tensors = {k: v if k.startswith("s.rng.") else v.to(device) for k, v in tensors.items()}
        return unflatten(json.loads(skeleton), tensors), about
    except PermissionError:
        raise
    except ChecksumError as e:
        raise ChecksumError(f"checkpoint {path} is damaged: {e} (its bytes changed after the save: a failing disk or "
                            f"a bad copy). Restore it from a copy, or delete it to restart that stage from step 0 "
                            f"(metrics.jsonl then restarts with it).") from None
    except (SafetensorError, KeyError, TypeError, ValueError, OSError) as e:
        raise ValueError(f"checkpoint {path} is damaged or not a tcmlab checkpoint ({e}). Restore it from a copy, "
                         f"or delete it to restart that stage from step 0 (metrics.jsonl then restarts with it)."
                         ) from None
