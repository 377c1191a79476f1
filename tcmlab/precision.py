"""Numerical precision of training: what `train.precision` means for autocast and for float32 matrix products.

- 'fp32': IEEE float32 throughout, TF32 off for matmuls and cuDNN convolutions. This is the official ECT/TCM
  CIFAR-10 recipe (their training loops, from EDM's, set `allow_tf32 = False` for both); torch's own default runs
  cuDNN convolutions in TF32 on Ampere and later GPUs, a 10-bit mantissa (docs/decisions.md §19).
- 'tf32': float32 weights and activations, TF32 tensor cores for matmuls and convolutions (opt-in, not the
  official recipe).
- 'bf16' / 'fp16': the network F runs under autocast (`Precond`), preconditioning, losses, optimiser and EMA stay
  in float32 (TF32 off); 'fp16' also uses a gradient scaler (`train()`). Inside F, the DDPM++ attention computes
  its q·k logits and softmax in float32, as EDM's `AttentionOp` does (`nets.ddpmpp`).

`cudnn_benchmark` is cuDNN's algorithm search per input shape (EDM's and ECT's training loops turn it on).
On the CPU none of these flags changes anything.
"""

from __future__ import annotations

import contextlib

import torch

AUTOCAST = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# torch >= 2.9 sets TF32 per backend through `fp32_precision` ('ieee' | 'tf32' | 'none': as its parent). Once it (or
# `torch.set_float32_matmul_precision`) has been used, reading the legacy `allow_tf32` flags raises, and setting them
# breaks `torch.get_float32_matmul_precision()`: so the new API where torch has it, the legacy flags before that.
_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


def _raw() -> dict:
    """The flags as torch holds them, to restore exactly."""
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    tf32 = ({"matmul": m.fp32_precision, "conv": c.conv.fp32_precision} if _NEW_API
            else {"matmul": m.allow_tf32, "conv": c.allow_tf32})
    return {**tf32, "fp16_reduced_reduction": m.allow_fp16_reduced_precision_reduction,
            "cudnn_benchmark": c.benchmark}


def _set_raw(raw: dict) -> None:
    """Set the flags; with the new API a value that its parents give (a backend's 'none' reads as the value it
    inherits) is restored as 'none', so that it follows later changes of torch.backends.fp32_precision again. cuDNN
    convolutions' own default ('tf32' in a fresh process) cannot be written back: it is restored as 'tf32'."""
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    if _NEW_API:
        for backend, value in ((m, raw["matmul"]), (c.conv, raw["conv"])):
            backend.fp32_precision = "none"
            if backend.fp32_precision != value:
                backend.fp32_precision = value
    else:
        m.allow_tf32, c.allow_tf32 = raw["matmul"], raw["conv"]
    m.allow_fp16_reduced_precision_reduction = raw["fp16_reduced_reduction"]
    c.benchmark = raw["cudnn_benchmark"]


def math_flags() -> dict:
    """torch's current float32-matmul and cuDNN flags (the ones `float32_math` sets), as booleans."""
    raw = _raw()
    tf32 = (lambda v: v == "tf32") if _NEW_API else bool
    return {"matmul_tf32": tf32(raw["matmul"]), "cudnn_tf32": tf32(raw["conv"]),
            "fp16_reduced_reduction": raw["fp16_reduced_reduction"], "cudnn_benchmark": raw["cudnn_benchmark"]}


@contextlib.contextmanager
def float32_math(precision: str, cudnn_benchmark: bool):
    """Inside: TF32 for matmuls and cuDNN convolutions, and fp16 matmuls with reduced-precision reductions, iff
    `precision == 'tf32'` (one switch, as in ECT's and EDM's loops: the official CIFAR-10 runs have all three off);
    cuDNN's benchmark mode as given. torch's previous flags are restored on exit (they are process-wide)."""
    if precision not in AUTOCAST:
        raise ValueError(f"precision must be one of {sorted(AUTOCAST)}, got {precision!r}")
    before = _raw()
    tf32 = precision == "tf32"
    mode = ("tf32" if tf32 else "ieee") if _NEW_API else tf32
    _set_raw({"matmul": mode, "conv": mode, "fp16_reduced_reduction": tf32, "cudnn_benchmark": bool(cudnn_benchmark)})
    try:
        yield
    finally:
        _set_raw(before)
