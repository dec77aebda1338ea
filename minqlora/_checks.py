"""Input checks shared by every lesson's functions: each error says what was wrong and what was
expected, and names the function (`where`) the caller called.

>>> check_blocksize(48, "quantize_4bit")
Traceback (most recent call last):
ValueError: quantize_4bit: blocksize must be a power of two >= 2, got 48
"""
import os
from pathlib import Path

import torch


def check_float(x, where: str) -> None:
    """A floating-point tensor with no NaN or Inf, and none beyond float32's range (absmaxes are
    stored in float32), or a TypeError / ValueError that says so."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: expected a floating-point tensor (float32, bfloat16, float16, "
                        f"float64), got {x.dtype}")
    if not x.numel():
        return
    xf = x.float() if x.element_size() == 1 else x.detach()     # float8: no isfinite of its own
    bad = (~torch.isfinite(xf)).sum().item()
    if bad:
        nan = torch.isnan(xf).sum().item()
        raise ValueError(f"{where}: input has {bad} non-finite value(s) ({nan} NaN, {bad - nan} "
                         f"Inf) out of {x.numel()}; quantization needs finite numbers")
    if x.dtype == torch.float64:
        big = torch.isinf(xf.float()).sum().item()
        if big:
            raise ValueError(f"{where}: {big} value(s) beyond float32's range (largest |x| "
                             f"{xf.abs().max().item():.4g} > 3.4028e+38): absmaxes are stored in "
                             "float32; scale the tensor down first")


def check_dtype(dtype, where: str) -> None:
    """None (keep the stored dtype) or a floating-point torch.dtype to decode into."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{where}: dtype must be a floating-point dtype, got {dtype}")


def check_blocksize(blocksize, where: str, name: str = "blocksize") -> None:
    """A power of two >= 2, as bitsandbytes' kernels need."""
    if (not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 2
            or blocksize & (blocksize - 1)):
        raise ValueError(f"{where}: {name} must be a power of two >= 2, got {blocksize!r}")


def check_bits(bits, where: str) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"{where}: bits must be an integer from 2 to 16, got {bits!r}")


def check_code(code, where: str, most: int = 256, increasing: bool = True) -> None:
    """A 1-D float codebook of 2 to `most` entries inside [-1, 1]; strictly increasing unless
    increasing=False (a 4-bit code may be stored in bit order, as FP4 is)."""
    if not isinstance(code, torch.Tensor) or code.dim() != 1 or not code.is_floating_point():
        raise ValueError(f"{where}: code must be a 1-D floating-point tensor")
    if not 2 <= code.numel() <= most:
        raise ValueError(f"{where}: code must have 2 to {most} entries (one per index), "
                         f"got {code.numel()}")
    if not torch.isfinite(code).all() or code.min() < -1 or code.max() > 1:
        raise ValueError(f"{where}: code values must lie in [-1, 1], got range "
                         f"[{code.min().item()!r}, {code.max().item()!r}]")
    if increasing and not (code[1:] > code[:-1]).all():
        raise ValueError(f"{where}: code must be sorted in strictly increasing order "
                         "(the nearest-code search uses midpoints between neighbours)")


def private_dir(path: Path, what: str, how: str) -> Path:
    """path, created with mode 0700 if missing; a RuntimeError naming it (and `how` to choose
    another) unless it is a folder of this user that group and others cannot write to. Files
    loaded from a folder others can write to could be anyone's code."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()                  # follows a symlink: the folder it points to counts
    except OSError as e:
        raise RuntimeError(f"{what} {path} cannot be used ({e}); {how}") from None
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise RuntimeError(f"{what} {path} belongs to user id {info.st_uid}, not to you "
                           f"({os.getuid()}); {how}")
    if info.st_mode & 0o022:
        raise RuntimeError(f"{what} {path} can be written by others (mode "
                           f"{info.st_mode & 0o777:o}), who could plant code there; {how}, or "
                           f"`chmod go-w {path}`")
    return path


def check_adamw_options(group: dict, where: str) -> None:
    """A ValueError for a torch AdamW option that minqlora's AdamW does not implement (rather
    than an update that silently ignores it)."""
    bad = [f"{k}={group[k]!r}" for k in ("amsgrad", "capturable", "differentiable", "fused")
           if group.get(k)]
    if group.get("decoupled_weight_decay") is False and group["weight_decay"] != 0:
        bad.append("decoupled_weight_decay=False (Adam's L2 penalty)")
    if bad:
        raise ValueError(f"PagedAdamW.{where}: {', '.join(bad)} is not implemented (AdamW with "
                         "or without maximize is); use torch.optim.AdamW for it")


def check_adamw_state(saved: dict, shape: torch.Size, where: str) -> torch.Tensor:
    """One parameter's saved AdamW state: step (one number; returned as a new 0-d tensor) and
    exp_avg, exp_avg_sq floating-point tensors of the parameter's shape, or a ValueError."""
    missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in saved]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    for k in ("exp_avg", "exp_avg_sq"):
        t = saved[k]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.shape != shape:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t)
            raise ValueError(f"{where}: {k} is {got}, but the parameter is a {tuple(shape)} "
                             "floating-point tensor (another model's checkpoint? torch's AdamW "
                             "refuses it too)")
    step = saved["step"]
    step = step.clone() if isinstance(step, torch.Tensor) else torch.tensor(float(step))
    if step.numel() != 1:
        raise ValueError(f"{where}: step must be one number, got shape {tuple(step.shape)}")
    return step.reshape(())
