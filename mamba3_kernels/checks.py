"""Argument checkers for the public calls: each raises ``TypeError`` / ``ValueError`` naming the
argument, what was expected and what came (validate.py composes them into a call's checks).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor

from .problem import ROTARY_LAYOUTS
from .state import Mamba3State

INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# The ssm state may be stored in 16 bits (a decode pool's memory); the angle may not (it
# accumulates over the whole sequence).
SSM_DTYPES = INPUT_DTYPES
ANGLE_DTYPES = (torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _fmt(shape) -> str:
    return str(tuple(int(s) for s in shape))


def _tensor(name: str, t, *, optional: bool = False) -> torch.Tensor | None:
    if t is None:
        if optional:
            return None
        raise TypeError(f"{name}: expected a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _shape(name: str, t: torch.Tensor, expected: tuple, why: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" {why}" if why else ""
        raise ValueError(f"{name}: expected shape {_fmt(expected)}{extra}, got {_fmt(t.shape)}")


def _float(name: str, t: torch.Tensor, allowed=INPUT_DTYPES) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(
            f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}"
        )


def _same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{name}: expected dtype {str(ref.dtype).replace('torch.', '')} to match {ref_name}, "
            f"got {str(t.dtype).replace('torch.', '')}"
        )


def _device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of q), got {t.device}")


def _rotary(rotary: str | None, mimo: bool) -> str:
    if rotary is None:
        return "halves" if mimo else "interleaved"
    if rotary not in ROTARY_LAYOUTS:
        raise ValueError(f"rotary: expected one of {ROTARY_LAYOUTS}, got {rotary!r}")
    return rotary


ENV_CHECK_VALUES = "MAMBA3_KERNELS_CHECK_VALUES"
# os.environ.get costs ~1 us for an absent name (a KeyError raised and caught inside), which a
# decode step pays on every call. CPython's os.environ keeps its (encoded) entries in ``_data``,
# updated by every os.environ assignment, so a lookup there sees the same values; elsewhere the
# plain lookup is used.
_ENV_DATA = getattr(os.environ, "_data", None)


def env_flag(name: str) -> Callable[[], bool]:
    """A function telling whether the environment variable ``name`` is "1", read on every call
    (so it can be switched) at the cost of a dict lookup."""
    try:
        key, on = os.environ.encodekey(name), os.environ.encodevalue("1")
    except AttributeError:
        key = on = None
    data = _ENV_DATA if key is not None else None
    if data is not None:
        return lambda: data.get(key) == on
    return lambda: os.environ.get(name, "0") == "1"


_check_values_env = env_flag(ENV_CHECK_VALUES)


def _check_values_enabled(device_type: str) -> bool:
    """Value-range checks need a host sync on GPU: always on CPU, opt-in on GPU (never while
    compiling or capturing a CUDA graph). ``device_type``: the type of q's device ("cuda")."""
    if device_type == "cpu":
        return not torch.compiler.is_compiling()
    # The environment first: off (the default) needs no further query.
    if not _check_values_env() or torch.compiler.is_compiling():
        return False
    return not (device_type == "cuda" and torch.cuda.is_current_stream_capturing())


def _check_values(adt: torch.Tensor, dt: torch.Tensor) -> None:
    # Written so that NaN fails each range test (every comparison with NaN is false).
    bad = torch.stack([
        (adt > 0).any(), ~(dt > 0).all(), ~torch.isfinite(adt).all(), torch.isinf(dt).any()
    ]).tolist()  # fmt: skip
    if bad[0]:
        raise ValueError("adt: expected A*dt <= 0 everywhere, got positive values")
    if bad[1]:
        raise ValueError("dt: expected dt > 0 everywhere, got values <= 0 or NaN")
    if bad[2]:
        raise ValueError("adt: expected finite values, got inf or NaN")
    if bad[3]:
        raise ValueError("dt: expected finite values, got inf")


def _check_cu_seqlens(
    cu: torch.Tensor, batch: int, seqlen: int, values: bool | None = None
) -> torch.Tensor:
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(
            "cu_seqlens: expected a 1-D tensor of nseq + 1 >= 2 offsets, "
            f"got shape {_fmt(cu.shape)}"
        )
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"cu_seqlens: expected dtype int32, got {str(cu.dtype).replace('torch.', '')}"
        )
    if batch != 1:
        raise ValueError(
            f"cu_seqlens: expected batch size 1 when packing sequences, got B = {batch}"
        )
    # (contiguous: a kernel reads the offsets through a plain pointer, so a strided view would be
    # read wrong)
    if values is None:
        values = not torch.compiler.is_compiling()
    if not values:
        return cu.to(torch.int32).contiguous()
    if cu.is_meta:
        raise ValueError("cu_seqlens: on the meta device; the offsets must hold values")
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"cu_seqlens: expected to start at 0, got {vals[0]}")
    if any(b < a for a, b in zip(vals, vals[1:], strict=False)):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {vals}")
    if vals[-1] != seqlen:
        raise ValueError(f"cu_seqlens: expected to end at L = {seqlen}, got {vals[-1]}")
    return cu.to(torch.int32).contiguous()


def _check_state(
    name: str,
    state,
    nseq: int,
    H: int,
    P: int,
    N: int,
    S: int,
    R: int,
    device: torch.device,
    need_contiguous: bool,
    pooled: bool = False,
) -> Mamba3State:
    """The state's checks; ``pooled``: its leading axis is a pool of slots (any size >= 1, read
    off state.ssm) rather than ``nseq``."""
    if not isinstance(state, tuple) or len(state) != 4:
        raise TypeError(
            f"{name}: expected a Mamba3State(angle, ssm, k, v), got {type(state).__name__}"
        )
    state = Mamba3State(*state)
    if pooled:
        ssm = _tensor(f"{name}.ssm", state.ssm)
        if ssm.dim() != 4 or ssm.shape[0] < 1:
            raise ValueError(
                f"{name}.ssm: expected a pool of shape (slots, H, P, N) = (slots, {H}, {P}, {N}) "
                f"with slots >= 1, got {_fmt(ssm.shape)}"
            )
        nseq = ssm.shape[0]
    expected = {
        "angle": (nseq, H, S),
        "ssm": (nseq, H, P, N),
        "k": (nseq, R, H, N),
        "v": (nseq, H, P),
    }
    for field, shape in expected.items():
        t = _tensor(f"{name}.{field}", getattr(state, field))
        _shape(f"{name}.{field}", t, shape)
        _float(f"{name}.{field}", t)
        _device(f"{name}.{field}", t, device)
        if need_contiguous and not t.is_contiguous():
            raise ValueError(
                f"{name}.{field}: expected a contiguous tensor (it is updated in place), "
                f"got strides {tuple(t.stride())}"
            )
    if state.angle.dtype not in ANGLE_DTYPES:  # (the angle stays wide: see ANGLE_DTYPES)
        raise TypeError(f"{name}.angle: expected dtype float32, got {state.angle.dtype}")
    _float(f"{name}.ssm", state.ssm, SSM_DTYPES)
    if need_contiguous:
        _check_no_alias(name, state)
    return state


def _check_no_alias(name: str, state: Mamba3State) -> None:
    """ValueError when two fields of a state updated in place share memory (views of one
    buffer): the kernels would write one field over another. ``state``: contiguous tensors, so
    each spans [data_ptr, data_ptr + nbytes). Skipped for tensors without memory (fake, meta)."""
    if torch.compiler.is_compiling() or isinstance(state.ssm, FakeTensor):
        return
    try:  # (plain loops: this runs on every decode step, ~1 us)
        spans = [(t.data_ptr(), t.nbytes) for t in state]
    except RuntimeError:  # a FakeTensor may have no data pointer
        return
    for i in range(4):
        start, size = spans[i]
        for j in range(i):
            other, other_size = spans[j]
            # (address 0: no memory, a fake or meta tensor)
            overlap = start < other + other_size and other < start + size
            if overlap and start and other and size and other_size:
                first, second = Mamba3State._fields[j], Mamba3State._fields[i]
                raise ValueError(
                    f"{name}.{second}: shares memory with {name}.{first} (views of one "
                    "buffer); each state field is updated in place and needs its own storage "
                    "(Mamba3State.zeros allocates one, or .clone() the fields)"
                )


def _check_indices(idx: torch.Tensor, batch: int, device: torch.device) -> None:
    """state_indices' shape, dtype, device and layout (the kernel reads it as a plain array)."""
    _shape("state_indices", idx, (batch,), "(one slot per batch row of q)")
    if idx.dtype not in INDEX_DTYPES:
        raise TypeError(
            "state_indices: expected dtype int32 or int64, "
            f"got {str(idx.dtype).replace('torch.', '')}"
        )
    _device("state_indices", idx, device)
    if not idx.is_contiguous():
        raise ValueError(
            f"state_indices: expected a contiguous tensor, got strides {tuple(idx.stride())}"
        )


def _check_index_values(idx: torch.Tensor, slots: int) -> None:
    """Each index < slots, and no slot named twice (two rows updating one slot in place would
    race); negative indices are padding rows. Reads the values on the host (a sync on GPU)."""
    if idx.is_meta:
        return
    vals = [i for i in idx.tolist() if i >= 0]
    if vals and max(vals) >= slots:
        raise ValueError(
            f"state_indices: expected indices < {slots} (the pool's slots), got {max(vals)}"
        )
    if len(set(vals)) != len(vals):
        seen: set[int] = set()
        dup = next(i for i in vals if i in seen or seen.add(i))
        raise ValueError(f"state_indices: expected distinct slots, got slot {dup} twice")
