"""Pictures of samples: image grids (torchvision) and 2-D scatter plots as PNG (PIL), no browser needed, and a
run's 1-/2-step sample grids (`sample_grids`)."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageDraw, PngImagePlugin

from .checkpoint import atomic_write_files


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[−1, 1] floats to uint8 by round-to-nearest of x·127.5 + 127.5 (the official FID quantisation)."""
    return (x.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def image_grid(x: torch.Tensor, nrow: int | None = None, scale: int = 1, pad: int = 1) -> Image.Image:
    """Tile images [N, C, H, W] in [−1, 1] into one PIL image (torchvision's make_grid on the uint8 images, white
    padding, nearest-neighbour upscaling by `scale`)."""
    from torchvision.utils import make_grid  # here: importing torchvision takes seconds, most callers never tile

    n, c = x.shape[:2]
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    grid = make_grid(to_uint8(x), nrow=nrow, padding=pad, pad_value=255)  # [3, H', W'] (grey images repeated)
    out = Image.fromarray(grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy())
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale > 1 else out


def scatter(points: torch.Tensor, size: int = 400, extent: float = 2.0) -> Image.Image:
    """2-D points [N, 2] drawn on a white square covering [−extent, extent]²."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    p = ((points.detach().cpu().numpy() + extent) / (2 * extent) * size)
    for x, y in p:
        draw.ellipse([x - 1, size - y - 1, x + 1, size - y + 1], fill=(31, 119, 180))
    return img


STEP_TAG = "tcmlab-step"  # PNG text entry: the training step of the checkpoint the samples came from
SAMPLE_NAMES = ("samples_1step.png", "samples_2step.png")  # what `sample_grids` writes


def png_bytes(x: torch.Tensor, step: int | None = None) -> bytes:
    """Samples as PNG bytes: an image grid for [N, C, H, W], a scatter plot for [N, 2]; `step`, the training step of
    the model that drew them, is stored in the PNG (`png_step` reads it)."""
    img = scatter(x) if x.ndim == 2 else image_grid(x, scale=max(1, 64 // x.shape[-1]))
    info = PngImagePlugin.PngInfo()
    if step is not None:
        info.add_text(STEP_TAG, str(int(step)))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_samples(samples: dict[str | Path, torch.Tensor], step: int | None = None) -> list[Path]:
    """Save each path's samples as a PNG (`png_bytes`), all or none: a failed write (a full disk) leaves every
    earlier file as it was (`checkpoint.atomic_write_files`)."""
    files = {Path(path): png_bytes(x, step) for path, x in samples.items()}
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_files(files)
    return list(files)


def png_step(path: str | Path) -> int | None:
    """The training step a sample PNG records (`save_samples`), or None if it records none or cannot be read."""
    try:
        with Image.open(path) as img:
            return int(img.info[STEP_TAG])
    except (OSError, KeyError, ValueError):
        return None


def sample_grids(run, out: str | Path, t_mid: float, n: int = 64, seed: int = 0, device: str | None = None,
                 batch: int = 1024) -> list[Path]:
    """1-step and 2-step (T → t_mid) samples of a run's EMA model (`samplers.one_and_two_step`) saved as
    out/samples_1step.png and out/samples_2step.png. run: a run directory (loaded on `device`, default CUDA when
    present) or a loaded `model.TrainedModel`."""
    from .model import TrainedModel, load_model
    from .samplers import one_and_two_step

    m = run if isinstance(run, TrainedModel) else load_model(
        run, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    samples = dict(zip(SAMPLE_NAMES, one_and_two_step(m, n, t_mid, seed, batch=batch).values()))
    for name, x in samples.items():  # counted and said, never patched (evaluate does the same)
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        if bad:
            warnings.warn(f"{name}: {bad} of {len(x)} samples hold non-finite values (t_mid={t_mid:g}); the grid "
                          f"shows them as they are cast to pixels", stacklevel=2)
    return save_samples({Path(out) / name: x for name, x in samples.items()}, m.step)
