"""DDPM++ U-Net in EDM's `SongUNet` layout (Karras et al. 2022; Song et al. 2021), the CIFAR-10 network of TCM App. E.

Module and parameter names follow NVlabs/edm `training/networks.py` (`map_layer0`, `enc['32x32_block0']`,
`dec['32x32_aux_conv']`, ...) so that the official `edm-cifar10-32x32-uncond-vp` weights map by name.
The paper configuration (`model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,)`) has
≈55.7M parameters at 32×32×3. Only the unconditional, positional-embedding, standard encoder/decoder variant is
built; no label or augmentation inputs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .dropout import RowDropout
from .layers import INIT, INIT_ATTN, INIT_ZERO, Conv2d, GroupNorm, Linear, PositionalEmbedding


class UNetBlock(nn.Module):
    """Residual block with embedding affine, optional up/down-sampling and optional self-attention (EDM)."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False, num_heads=1,
                 dropout=0.0, skip_scale=float(np.sqrt(0.5)), eps=1e-6, resample_filter=(1, 1)):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = num_heads if attention else 0
        self.skip_scale = skip_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter,
                            **INIT)
        self.affine = Linear(emb_channels, out_channels, **INIT)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.dropout = RowDropout(dropout)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **INIT_ZERO)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, kernel=1, up=up, down=down, resample_filter=resample_filter,
                               **INIT)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **INIT_ATTN)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **INIT_ZERO)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        x = F.silu(self.norm1(x + self.affine(emb).to(x.dtype)[:, :, None, None]))
        x = self.conv1(self.dropout(x))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            h, w = x.shape[-2:]
            # EDM's layout: qkv channels are (head, channel, 3); attention over the h·w positions.
            q, k, v = rearrange(self.qkv(self.norm2(x)), "b (n c three) h w -> three (b n) c (h w)",
                                n=self.num_heads, three=3)
            # EDM's AttentionOp: logits and softmax in float32 also under mixed precision (bf16 logits would be
            # ~3 significant digits); the weights go back to q's dtype for the product with v.
            with torch.autocast(x.device.type, enabled=False):
                attn = torch.einsum("ncq,nck->nqk", q.float(), (k / np.sqrt(q.shape[1])).float()).softmax(dim=2)
            a = torch.einsum("nqk,nck->ncq", attn.to(q.dtype), v)
            a = rearrange(a, "(b n) c (h w) -> b (n c) h w", n=self.num_heads, h=h, w=w)
            x = (self.proj(a) + x) * self.skip_scale
        return x


class SongUNet(nn.Module):
    """F(x, c_noise) for images: DDPM++ (EDM `SongUNet`, positional embedding, standard encoder/decoder)."""

    def __init__(self, img_resolution=32, in_channels=3, out_channels=3, model_channels=128, channel_mult=(2, 2, 2),
                 channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10, resample_filter=(1, 1)):
        super().__init__()
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels
        block = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=resample_filter)

        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        self.map_layer0 = Linear(noise_channels, emb_channels, **INIT)
        self.map_layer1 = Linear(emb_channels, emb_channels, **INIT)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **INIT)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
            if level == 0:
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **INIT_ZERO)

    def forward(self, x, c_noise):
        emb = self.map_noise(c_noise)
        emb = rearrange(emb, "b (two c) -> b two c", two=2).flip(1).flatten(1)  # EDM swaps sin/cos halves
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips = []
        for m in self.enc.values():
            x = m(x, emb) if isinstance(m, UNetBlock) else m(x)
            skips.append(x)

        out = None
        for name, m in self.dec.items():
            if name.endswith("aux_norm"):
                out = m(x)
            elif name.endswith("aux_conv"):
                out = m(F.silu(out))
            else:
                if x.shape[1] != m.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = m(x, emb)
        return out
