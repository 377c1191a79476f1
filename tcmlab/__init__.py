"""tcmlab: Truncated Consistency Models (Lee et al., ICLR 2025) and Easy Consistency Tuning (Geng et al., 2024).

The science lives in small modules, one concept each:
precond (EDM scalings, Eq. 3), schedules (ECT ratio/Δt, time distributions), losses (stage 0/1/2),
nets (MLP, DDPM++ U-Net), samplers (1- and multi-step), data, ema, checkpoint, config (presets), train.
"""

__version__ = "0.1.0"
