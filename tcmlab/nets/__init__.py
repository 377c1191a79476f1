"""Networks F(x, c_noise): an MLP for 2-D points and flattened digits, and EDM's DDPM++ U-Net (SongUNet layout)."""

from .ddpmpp import SongUNet
from .dropout import RowDropout, dropout_rows, get_rng_state, set_rng_state
from .mlp import MLP

__all__ = ["MLP", "SongUNet", "RowDropout", "dropout_rows", "get_rng_state", "set_rng_state", "build_net"]


def build_net(cfg, shape: tuple[int, ...]):
    """Build the network F described by a `NetConfig` for data samples of `shape` (C, H, W) or (D,)."""
    if cfg.arch == "mlp":
        return MLP(shape, hidden=cfg.channels, depth=cfg.depth, emb_dim=cfg.emb_channels, dropout=cfg.dropout)
    if cfg.arch == "ddpmpp":
        if len(shape) != 3:
            raise ValueError(f"net.arch='ddpmpp' needs image data (C, H, W), got sample shape {shape}")
        return SongUNet(img_resolution=shape[1], in_channels=shape[0], out_channels=shape[0],
                        model_channels=cfg.channels, channel_mult=cfg.channel_mult, num_blocks=cfg.depth,
                        attn_resolutions=cfg.attn_resolutions, dropout=cfg.dropout)
    raise ValueError(f"net.arch must be 'mlp' or 'ddpmpp', got {cfg.arch!r}")
