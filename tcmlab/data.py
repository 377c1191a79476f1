"""Data sets as tensors: 2-D toy distributions, sklearn's bundled 8×8 digits (the embedded default), CIFAR-10.

Images are scaled to [−1, 1] (EDM convention, σ_data = 0.5). Small data sets live on the training device as one
tensor and batches are drawn by index, with no DataLoader per step.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TOY2D = ("moons", "gaussians8")
CIFAR_HELP = ("Download the CIFAR-10 python version (cifar-10-python.tar.gz) from "
              "https://www.cs.toronto.edu/~kriz/cifar.html and extract it so that {root}/cifar-10-batches-py/"
              "data_batch_1 ... data_batch_5 exist, or set data.root to the folder that holds cifar-10-batches-py.")


@dataclass
class TensorData:
    """A data set held as one tensor x [N, *shape] (float in [−1, 1], or uint8 images converted per batch)."""

    x: torch.Tensor
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device) -> "TensorData":
        return TensorData(self.x.to(device), self.name)

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.x[idx.to(self.x.device)]
        return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x


def toy2d(name: str = "moons", n: int = 8192, seed: int = 0) -> TensorData:
    """2-D toy data with per-coordinate std ≈ 0.5 (σ_data): two moons or a ring of 8 Gaussians."""
    g = np.random.default_rng(seed)
    if name == "moons":
        from sklearn.datasets import make_moons
        x, _ = make_moons(n, noise=0.05, random_state=seed)
    elif name == "gaussians8":
        angles = 2 * math.pi * g.integers(0, 8, n) / 8
        x = np.stack([np.cos(angles), np.sin(angles)], 1) * 2 + 0.1 * g.standard_normal((n, 2))
    else:
        raise ValueError(f"toy data must be one of {TOY2D}, got {name!r}")
    x = (x - x.mean(0)) / x.std(0) * 0.5
    return TensorData(torch.as_tensor(x, dtype=torch.float32), f"toy2d-{name}")


def digits() -> TensorData:
    """sklearn's bundled handwritten digits: 1,797 real 8×8 images, values 0..16 scaled to [−1, 1], shape 1×8×8."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16 * 2 - 1
    return TensorData(x, "digits")


def digits_labels() -> torch.Tensor:
    from sklearn.datasets import load_digits
    return torch.as_tensor(load_digits().target, dtype=torch.long)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 python batch holds: dicts, lists, bytes, ints and uint8 numpy arrays.

    Any other global (the way a crafted pickle runs code) is refused, so a file in the data folder cannot execute
    anything when it is read."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds only arrays, lists "
                                     f"and bytes")


def _read_cifar_batch(path: Path) -> np.ndarray:
    with open(path, "rb") as fh:
        batch = _CifarUnpickler(fh, encoding="bytes").load()
    if not isinstance(batch, dict) or b"data" not in batch:
        raise ValueError("no b'data' entry")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError("b'data' is not a uint8 array of shape [N, 3072]")
    return data.reshape(-1, 3, 32, 32)


def cifar10(root: str | Path, train: bool = True) -> TensorData:
    """CIFAR-10 from the standard python-pickle batches under {root}/cifar-10-batches-py (uint8, converted per batch),
    read with a restricted unpickler that cannot execute code."""
    folder = Path(root) / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}. " + CIFAR_HELP.format(root=root))
    arrays = []
    for n in names:
        try:
            arrays.append(_read_cifar_batch(folder / n))
        except (pickle.UnpicklingError, ValueError, EOFError, TypeError, AttributeError, IndexError) as e:
            raise ValueError(f"{folder / n} is not a CIFAR-10 python batch ({e}). "
                             + CIFAR_HELP.format(root=root)) from None
    return TensorData(torch.from_numpy(np.concatenate(arrays)), "cifar10")


def synthetic_images(n: int, shape=(3, 32, 32), seed: int = 0) -> TensorData:
    """Random uint8 images of a given shape: CIFAR-shaped stand-in data for benchmarks and dry runs."""
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8), f"synthetic{list(shape)}")


def load_data(cfg) -> TensorData:
    """Build the data set a `DataConfig` names ('digits', 'toy2d', 'cifar10', 'synthetic')."""
    if cfg.name == "digits":
        return digits()
    if cfg.name == "toy2d":
        return toy2d(cfg.toy)
    if cfg.name == "cifar10":
        return cifar10(cfg.root)
    if cfg.name == "synthetic":
        return synthetic_images(cfg.synthetic_n)
    raise ValueError(f"data.name must be 'digits', 'toy2d', 'cifar10' or 'synthetic', got {cfg.name!r}")
