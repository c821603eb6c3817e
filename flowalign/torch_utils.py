"""Device and dtype names as configs spell them."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None = "auto", key: str = "device") -> torch.device:
    """``"auto"`` or None → the CUDA device when there is one, else CPU; anything else as torch reads
    it, checked to exist on this machine (``UserError`` naming ``key`` otherwise)."""
    from .errors import UserError

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"{key}={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{key}={device!r} but torch sees no CUDA GPU on this machine; use {key}=cpu "
                            f"(or auto)")
        if dev.index is not None and dev.index >= count:
            raise UserError(f"{key}={device!r} but this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1}); "
                            f"choose one of those")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{key}={device!r} but MPS is not available on this machine; use {key}=cpu (or auto)")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype from its name (``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: the local shard of a ``DTensor`` (FSDP2), else ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t``: a ``DTensor``'s shards gathered (a collective: every process must call it), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
