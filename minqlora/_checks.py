"""Input checks shared by every lesson's functions: each error says what was wrong and what was
expected, and names the function (`where`) the caller called.

>>> check_blocksize(48, "quantize_4bit")
Traceback (most recent call last):
ValueError: quantize_4bit: blocksize must be a power of two >= 2, got 48 (and at most 2^62)
"""
import math
import os
import stat
from pathlib import Path

import torch

MAX_SIZE = 2 ** 62   # largest blocksize or value count: C++'s 64-bit index arithmetic (a block
                     # index times a blocksize, plus a blocksize) stays below 2^63
DECODABLE = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn,
             torch.float8_e5m2)   # what a 4-bit weight decodes into (torch casts float32 to them)


class SetupError(RuntimeError):
    """The machine's setup cannot serve the call: no usable C++ compiler or build cache folder.
    The message is one line first (the CLI prints only that line)."""


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
    """None (keep the stored dtype) or a floating-point torch.dtype to decode into (DECODABLE)."""
    if dtype is not None and dtype not in DECODABLE:
        raise TypeError(f"{where}: dtype must be a floating-point dtype, got {dtype} (one of "
                        f"{', '.join(str(d)[6:] for d in DECODABLE)})")


def check_blocksize(blocksize, where: str, name: str = "blocksize") -> None:
    """A power of two from 2 to MAX_SIZE = 2^62, as bitsandbytes' kernels need (and C++'s
    64-bit arithmetic: 1 << 63 is undefined)."""
    if (not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 2
            or blocksize & (blocksize - 1) or blocksize > MAX_SIZE):
        raise ValueError(f"{where}: {name} must be a power of two >= 2, got {blocksize!r} "
                         "(and at most 2^62)")


def check_numel(shape, where: str) -> int:
    """The number of values of `shape` (sizes >= 0), counted exactly (torch.Size.numel() wraps
    around at 2^63: [2**32, 2**32] gives 0), or a ValueError beyond MAX_SIZE."""
    n = math.prod(shape)
    if n > MAX_SIZE:
        raise ValueError(f"{where}: shape {list(shape)} holds {n} values, more than 2^62")
    return n


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
    """path, created with mode 0700 if missing; a SetupError naming it (and `how` to choose
    another) unless it is a folder of this user that group and others cannot write to, reached
    through no link of another user and inside no folder where anyone may rename it (world-
    writable without the sticky bit, as /tmp has). Files loaded from a folder others can write
    to, or swap for their own, could be anyone's code."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info, real = path.stat(), Path(os.path.realpath(path))   # the folder a link points to
        links = [(p, p.lstat()) for p in (path.absolute(), *path.absolute().parents)]
        parents = [(p, p.stat().st_mode) for p in real.parents]
    except OSError as e:
        raise SetupError(f"{what} {path} cannot be used ({e}); {how}") from None
    me = os.getuid() if hasattr(os, "getuid") else info.st_uid
    planted = [(p, s.st_uid) for p, s in links
               if stat.S_ISLNK(s.st_mode) and s.st_uid not in (0, me)]
    if planted:
        raise SetupError(f"{what} {path}: {planted[0][0]} is a link made by user id "
                         f"{planted[0][1]}, who chose where it points; {how}")
    if info.st_uid != me:
        raise SetupError(f"{what} {path} belongs to user id {info.st_uid}, not to you ({me}); "
                         f"{how}")
    if info.st_mode & 0o022:
        raise SetupError(f"{what} {path} can be written by others (mode {info.st_mode & 0o777:o}), "
                         f"who could plant code there; {how}, or `chmod go-w {path}`")
    open_to_all = [p for p, mode in parents if mode & 0o002 and not mode & stat.S_ISVTX]
    if open_to_all:
        raise SetupError(f"{what} {path} lies inside {open_to_all[0]}, which everyone can write to "
                         "(no sticky bit): anyone could rename the cache and put theirs in its "
                         f"place; {how}")
    return path


def check_adamw_hyper(group: dict, where: str) -> None:
    """lr, eps, weight_decay: finite real numbers >= 0; betas: two finite numbers in [0, 1), as
    PagedAdamW's constructor and load_state_dict take them; else a ValueError."""
    betas = group.get("betas")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for name, value, below_1 in (("lr", group.get("lr"), False), ("eps", group.get("eps"), False),
                                 ("weight_decay", group.get("weight_decay"), False),
                                 ("betas[0]", betas[0], True), ("betas[1]", betas[1], True)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not \
                (0 <= value < (1 if below_1 else math.inf)):
            bound = " and < 1" if below_1 else ""
            raise ValueError(f"{where}: {name} must be >= 0{bound}, got {value!r} (a finite "
                             "float)")


def check_adamw_options(group: dict, where: str) -> None:
    """A ValueError for a torch AdamW option that minqlora's AdamW does not implement (rather
    than an update that silently ignores it), or a hyperparameter check_adamw_hyper refuses."""
    bad = [f"{k}={group[k]!r}" for k in ("amsgrad", "capturable", "differentiable", "fused")
           if group.get(k)]
    if group.get("decoupled_weight_decay") is False and group["weight_decay"] != 0:
        bad.append("decoupled_weight_decay=False (Adam's L2 penalty)")
    if bad:
        raise ValueError(f"PagedAdamW.{where}: {', '.join(bad)} is not implemented (AdamW with "
                         "or without maximize is); use torch.optim.AdamW for it")
    check_adamw_hyper(group, f"PagedAdamW.{where}")


def check_adamw_state(saved: dict, p: torch.Tensor, dtype: torch.dtype, where: str) -> dict:
    """One parameter's saved AdamW state, checked: step (one finite number >= 0) and exp_avg,
    exp_avg_sq finite floating-point tensors of p's shape (exp_avg_sq >= 0), or a ValueError.
    Returns a copy: step as a 0-d tensor, the averages in `dtype` on p's device."""
    shape = p.shape
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
    if isinstance(step, bool) or not isinstance(step, (torch.Tensor, int, float)):
        raise ValueError(f"{where}: step must be a number, got {type(step).__name__}")
    step = step.clone() if isinstance(step, torch.Tensor) else torch.tensor(float(step))
    if step.numel() != 1 or step.is_complex() or not (0 <= step.double().item() < math.inf):
        raise ValueError(f"{where}: step must be one finite number >= 0, got {step!r}")
    for k in ("exp_avg", "exp_avg_sq"):             # float8 has no isfinite of its own
        t = saved[k] if saved[k].element_size() > 1 else saved[k].float()
        if not torch.isfinite(t).all() or (k == "exp_avg_sq" and (t < 0).any()):
            raise ValueError(f"{where}: {k} must be finite{' and >= 0' * (k == 'exp_avg_sq')} "
                             "(the running averages of g and g^2)")
    return {"step": step.reshape(()), **{k: saved[k].to(p.device, dtype, copy=True).contiguous()
                                         for k in ("exp_avg", "exp_avg_sq")}}
