"""Pictures of samples: image grids and 2-D scatter plots as PNG (PIL only, no browser needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[−1, 1] floats to uint8 by round-to-nearest of x·127.5 + 127.5 (the official FID quantisation)."""
    return (x.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def image_grid(x: torch.Tensor, nrow: int | None = None, scale: int = 1, pad: int = 1) -> Image.Image:
    """Tile images [N, C, H, W] in [−1, 1] into one PIL image (nearest-neighbour upscaling by `scale`)."""
    n, c, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    img = to_uint8(x).permute(0, 2, 3, 1).numpy()
    canvas = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img[k]
    out = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale > 1 else out


def scatter(points: torch.Tensor, size: int = 400, extent: float = 2.0) -> Image.Image:
    """2-D points [N, 2] drawn on a white square covering [−extent, extent]²."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    p = ((points.detach().cpu().numpy() + extent) / (2 * extent) * size)
    for x, y in p:
        draw.ellipse([x - 1, size - y - 1, x + 1, size - y + 1], fill=(31, 119, 180))
    return img


def save_samples(x: torch.Tensor, path: str | Path) -> Path:
    """Save samples as a PNG: an image grid for [N, C, H, W], a scatter plot for [N, 2]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = scatter(x) if x.ndim == 2 else image_grid(x, scale=max(1, 64 // x.shape[-1]))
    img.save(path)
    return path
