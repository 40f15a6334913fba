"""Input checks for the public calls: every argument is checked before any kernel runs.

``validate_scan`` / ``validate_step`` raise ``TypeError`` / ``ValueError`` naming the argument, what
was expected and what came, and return the call's :class:`Problem` with its :class:`ScanInputs`.
"""

from __future__ import annotations

import torch

from .checks import (
    _check_cu_seqlens,
    _check_index_values,
    _check_indices,
    _check_no_alias,
    _check_state,
    _check_values,
    _check_values_enabled,
    _device,
    _float,
    _fmt,
    _rotary,
    _same_dtype,
    _shape,
    _tensor,
)
from .inputs import ScanInputs
from .problem import Problem
from .state import Mamba3State

# Calls already validated, by signature (shapes, dtypes, devices and layouts of every tensor, and
# the options): a decode loop repeats one signature, and re-checking it costs more host time than
# the step's kernel. A hit is sound: the signature holds every property the checks read (the rest
# of the checks are on sizes, so equal signatures pass or fail together). Each entry's Problem is
# its own object (made on the miss), so it also stands for the full layout of the call.
_VALIDATED: dict[tuple, Problem] = {}
_VALIDATED_MAX = 256
# The last signature that hit, and its Problem: a decode loop repeats one signature, and comparing
# with it skips hashing the signature (~60 entries) on every call. One (key, problem) pair,
# replaced whole, so that threads never see one call's key with another's Problem.
_LAST_HIT: list = [(None, None)]


class ValidatedInputs(ScanInputs):
    """ScanInputs returned by a hit of the validation memo. ``validated_problem`` (an attribute,
    not a field) is the memo's Problem for their signature: every tensor's shape, dtype, device and
    layout (``_signature``) are those of the call that made the entry, so a backend may key work
    (a launch plan) on that Problem's identity when ``inputs.validated_problem is problem``.
    Copies made by ``_replace`` do not carry the attribute."""


def _signature(step, tensors, state, options, indices=None) -> tuple | None:
    """The call's metadata, or None when an argument is not a tensor (full checks then).

    Shape, dtype and device of every tensor (None where absent); the strides of the per-step
    tensors (q, k, v, z, adt, dt, trap, angles: kernels index them by stride); whether the
    per-head parameters and the state are contiguous (the checks constrain the state's layout;
    kernels copy non-contiguous parameters). With sizes fixed, that contiguity fixes the offsets
    of every element. Spelled out tensor by tensor, without loops or helper calls: it is on the
    decode hot path, where each attribute read costs ~0.1 us.
    """
    q, k, v, adt, dt, trap, qb, kb, ang, d, z, mv, mz, mo = tensors
    try:
        sig = (
            step, options,
            q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device,
            v.shape, v.stride(), v.dtype, v.device, adt.shape, adt.stride(), adt.dtype, adt.device,
            dt.shape, dt.stride(), dt.dtype, dt.device,
            trap.shape, trap.stride(), trap.dtype, trap.device,
            qb.shape, qb.is_contiguous(), qb.dtype, qb.device,
            kb.shape, kb.is_contiguous(), kb.dtype, kb.device,
            ang.shape, ang.stride(), ang.dtype, ang.device,
            None if d is None else (d.shape, d.is_contiguous(), d.dtype, d.device),
            None if z is None else (z.shape, z.stride(), z.dtype, z.device),
            None if mv is None else (mv.shape, mv.is_contiguous(), mv.dtype, mv.device),
            None if mz is None else (mz.shape, mz.is_contiguous(), mz.dtype, mz.device),
            None if mo is None else (mo.shape, mo.is_contiguous(), mo.dtype, mo.device),
        )  # fmt: skip
        if state is None:
            return sig
        if not isinstance(state, tuple):  # the checks require a Mamba3State (a tuple)
            return None
        sa, ss, sk, sv = state
        if indices is not None:
            sig += (indices.shape, indices.dtype, indices.device, indices.is_contiguous())
        return sig + (
            sa.shape, sa.is_contiguous(), sa.dtype, sa.device,
            ss.shape, ss.is_contiguous(), ss.dtype, ss.device,
            sk.shape, sk.is_contiguous(), sk.dtype, sk.device,
            sv.shape, sv.is_contiguous(), sv.dtype, sv.device,
        )  # fmt: skip
    except (AttributeError, TypeError, ValueError):  # not tensors, or not 4 of them
        return None


def _validate(
    step: bool,
    tensors: tuple,
    state,
    return_final_state,
    cu_seqlens,
    rotary,
    chunk_size,
    values: bool | None = None,
    state_indices=None,
) -> tuple[Problem, ScanInputs]:
    """Memoized front of ``_check_and_describe``; ``tensors``: q .. mimo_o (ScanInputs order).
    ``values``: run the value checks (adt, dt, cu_seqlens offsets); None: the default rule.
    ``state_indices`` (B,): the slot of each batch row when the state is a pool (steps only);
    its values are checked on every call (never memoized)."""
    key = None
    if cu_seqlens is None and not torch.compiler.is_compiling():
        options = (rotary, bool(return_final_state), chunk_size, type(chunk_size),
                   state_indices is None)  # fmt: skip
        key = _signature(step, tensors, state, options, state_indices)
        last_key, problem = _LAST_HIT[0]
        if key is None or key != last_key:
            try:
                problem = None if key is None else _VALIDATED.get(key)
            except TypeError:  # an unhashable option (rejected by the full checks)
                key = problem = None
            if problem is not None:
                _LAST_HIT[0] = (key, problem)
        if problem is not None:
            if values if values is not None else _check_values_enabled(problem.device_type):
                _check_values(tensors[3], tensors[4])
                if state_indices is not None:
                    _check_index_values(state_indices, state[1].shape[0])
            if state is not None and type(state) is not Mamba3State:
                state = Mamba3State(*state)
            if step:  # (the signature holds layouts, not addresses)
                _check_no_alias("state", state)
            # tuple.__new__: the named tuple's own constructor is a Python function (~0.6 us).
            inputs = _tuple_new(ValidatedInputs, (*tensors, state, None))
            inputs.validated_problem = problem
            return problem, inputs
    problem, inputs = _check_and_describe(step, tensors, state, return_final_state, cu_seqlens,
                                          rotary, chunk_size, values, state_indices)  # fmt: skip
    if key is not None:
        if len(_VALIDATED) >= _VALIDATED_MAX:
            _VALIDATED.clear()
        _VALIDATED[key] = problem
        # The entry's Problem stands for this call's signature from now on, this call included
        # (so a backend's plan keyed on it is made once, not once for the miss and once more).
        inputs = _tuple_new(ValidatedInputs, inputs)
        inputs.validated_problem = problem
    return problem, inputs


_tuple_new = tuple.__new__


_NO_L_AXIS = (
    "; step takes no L axis: per-token tensors q, k (B, G, N) or (B, R, G, N), v (B, H, P), "
    "adt (B, H) (drop the axis: x[:, 0], or call scan for L tokens)"
)


def _check_and_describe(
    step: bool,
    tensors: tuple,
    state,
    return_final_state,
    cu_seqlens,
    rotary,
    chunk_size,
    values: bool | None = None,
    state_indices=None,
) -> tuple[Problem, ScanInputs]:
    """The full checks (``values``: as _validate's); ``tensors``: q .. mimo_o (ScanInputs
    order), returned unchanged in the ScanInputs."""
    q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o = tensors
    # With the L axis absent (a step), the same checks run on shapes with L = 1 inserted.
    q = _tensor("q", q)
    siso_dims, mimo_dims = (3, 4) if step else (4, 5)
    if q.dim() not in (siso_dims, mimo_dims):
        layout = "(B, G, N) or (B, R, G, N)" if step else "(B, L, G, N) or (B, L, R, G, N)"
        raise ValueError(
            f"q: expected {siso_dims} or {mimo_dims} dims {layout}, got shape {_fmt(q.shape)}"
            + (_NO_L_AXIS if step and q.dim() > mimo_dims else "")
        )
    _float("q", q)
    mimo = q.dim() == mimo_dims
    if step and mimo and (mimo_v is None or getattr(q_bias, "dim", lambda: 3)() == 2):
        # A 4-D q without MIMO's mimo_v / (H, R, N) biases: a SISO token with an L = 1 axis.
        raise ValueError(
            f"q: got shape {_fmt(q.shape)} for a SISO step (no mimo_v, q_bias (H, N))"
            + _NO_L_AXIS
        )
    device = q.device
    if mimo:
        B, *rest = q.shape
        L, (R, G, N) = (1, rest) if step else (rest[0], rest[1:])
    else:
        B, *rest = q.shape
        R = 1
        L, (G, N) = (1, rest) if step else (rest[0], rest[1:])
    lead = (B,) if step else (B, L)
    k = _tensor("k", k)
    _shape("k", k, q.shape, "to match q")
    v = _tensor("v", v)
    if v.dim() != len(lead) + 2:
        raise ValueError(
            f"v: expected shape {'(B, H, P)' if step else '(B, L, H, P)'}, got {_fmt(v.shape)}"
            + (_NO_L_AXIS if step and v.dim() == 4 else "")
        )
    H, P = v.shape[-2], v.shape[-1]
    _shape("v", v, lead + (H, P), "(batch and length of q)")
    for name, t in (("k", k), ("v", v)):
        _same_dtype(name, t, "q", q)
        _device(name, t, device)
    if G == 0 or H % G != 0:
        raise ValueError(
            f"v: expected the number of heads H = {H} to be a multiple of the groups G = {G} of q"
        )
    if N % 2 != 0:
        raise ValueError(f"q: expected an even state size N (rotary pairs), got N = {N}")
    coef = (B, H) if step else (B, H, L)
    for name, t in (("adt", adt), ("dt", dt), ("trap", trap)):
        t = _tensor(name, t)
        _shape(name, t, coef)
        _float(name, t)
        _device(name, t, device)
    bias = (H, R, N) if mimo else (H, N)
    for name, t in (("q_bias", q_bias), ("k_bias", k_bias)):
        t = _tensor(name, t)
        _shape(name, t, bias)
        _float(name, t)
        _device(name, t, device)
    angles = _tensor("angles", angles)
    if angles.dim() != len(lead) + 2:
        raise ValueError(
            f"angles: expected shape {'(B, H, S)' if step else '(B, L, H, S)'}, "
            f"got {_fmt(angles.shape)}"
        )
    S = angles.shape[-1]
    _shape("angles", angles, lead + (H, S))
    if S > N // 2:
        raise ValueError(f"angles: expected S <= N/2 = {N // 2} rotary angles, got S = {S}")
    _float("angles", angles)
    _device("angles", angles, device)
    if _tensor("D", D, optional=True) is not None:
        _shape("D", D, (H,))
        _float("D", D)
        _device("D", D, device)
    if _tensor("z", z, optional=True) is not None:
        _shape("z", z, v.shape, "to match v")
        _same_dtype("z", z, "v", v)
        _device("z", z, device)
    for name, t in (("mimo_v", mimo_v), ("mimo_z", mimo_z), ("mimo_o", mimo_o)):
        if _tensor(name, t, optional=True) is None:
            continue
        if not mimo:
            raise ValueError(
                f"{name}: only for MIMO (q with a rank axis), got a tensor for a SISO call"
            )
        _shape(name, t, (H, R, P))
        _float(name, t)
        _device(name, t, device)
    if mimo and mimo_v is None:
        raise ValueError(f"mimo_v: expected a tensor of shape {_fmt((H, R, P))} for MIMO, got None")
    if mimo and z is not None and mimo_z is None:
        raise ValueError(
            f"mimo_z: expected a tensor of shape {_fmt((H, R, P))} for MIMO with z, got None"
        )
    rotary = _rotary(rotary, mimo)
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    nseq = B
    if cu_seqlens is not None:
        cu_seqlens = _check_cu_seqlens(_tensor("cu_seqlens", cu_seqlens), B, L, values)
        _device("cu_seqlens", cu_seqlens, device)
        nseq = cu_seqlens.shape[0] - 1
    state_name = "state" if step else "initial_state"
    if state is None and step:
        raise TypeError("state: expected a Mamba3State, got None (Mamba3State.zeros allocates one)")
    pooled = state_indices is not None
    if pooled:
        if not step:
            raise ValueError("state_indices: only for step (a decode pool), got it for a scan")
        _check_indices(_tensor("state_indices", state_indices), B, device)
    if state is not None:
        state = _check_state(state_name, state, nseq, H, P, N, S, R, device, need_contiguous=step,
                             pooled=pooled)  # fmt: skip
    if values if values is not None else _check_values_enabled(device.type):
        _check_values(adt, dt)
        if pooled:
            _check_index_values(state_indices, state.ssm.shape[0])
    inputs = ScanInputs(*tensors, state, cu_seqlens)  # the checks return each tensor as given
    problem = describe(inputs, step, rotary, return_final_state, chunk_size, pooled)
    return problem, inputs


def validate_scan(
    q,
    k,
    v,
    adt,
    dt,
    trap,
    q_bias,
    k_bias,
    angles,
    D=None,
    z=None,
    mimo_v=None,
    mimo_z=None,
    mimo_o=None,
    initial_state=None,
    return_final_state=False,
    cu_seqlens=None,
    rotary=None,
    chunk_size=None,
) -> tuple[Problem, ScanInputs]:
    """Check a ``scan`` call (shapes per docs/spec.md) and describe it.

    Raises TypeError/ValueError."""
    tensors = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o)
    return _validate(
        False, tensors, initial_state, return_final_state, cu_seqlens, rotary, chunk_size
    )


def validate_step(
    q,
    k,
    v,
    adt,
    dt,
    trap,
    q_bias,
    k_bias,
    angles,
    state,
    D=None,
    z=None,
    mimo_v=None,
    mimo_z=None,
    mimo_o=None,
    rotary=None,
    state_indices=None,
) -> tuple[Problem, ScanInputs]:
    """Check a ``step`` call (the L axis absent) and describe it. ``inputs.initial_state`` is the
    state to update (a pool of slots with ``state_indices`` (B,))."""
    tensors = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o)
    return _validate(
        True, tensors, state, True, None, rotary, None, state_indices=state_indices
    )


def check_op_inputs(
    step: bool,
    inputs: ScanInputs,
    rotary: str | None,
    return_final_state: bool,
    chunk_size: int | None,
    fake: bool = False,
    state_indices: torch.Tensor | None = None,
) -> tuple[Problem, ScanInputs]:
    """The checks of validate_scan / validate_step, for the registered ops' bodies and fake
    impls: a direct ``torch.ops.mamba3.scan`` call (or one torch.compile traced) gets the same
    errors as ``mamba3_kernels.scan`` instead of a crash or a wrong-shaped result.

    Shape checks always run. Value checks (adt <= 0, dt > 0, cu_seqlens offsets) need the
    values: never in a fake impl (``fake``), else where they cost no device sync (CPU) or when
    the environment opts in (see _check_values_enabled). Returns the Problem and the inputs
    (cu_seqlens as contiguous int32). ``state_indices``: a step's pool slots, as validate_step's."""
    values = False if fake else _check_values_enabled(inputs.q.device.type)
    tensors = tuple(inputs[: len(inputs) - 2])
    return _validate(step, tensors, inputs.initial_state, return_final_state, inputs.cu_seqlens,
                     rotary, chunk_size, values, state_indices)  # fmt: skip


def describe(
    inputs: ScanInputs,
    step: bool,
    rotary: str | None,
    return_final_state: bool,
    chunk_size: int | None,
    pooled: bool = False,
) -> Problem:
    """The Problem of already-checked inputs, read off their shapes (no checks, no host sync);
    ``pooled``: the state is a pool addressed by state_indices."""
    q, v = inputs.q, inputs.v
    mimo = q.dim() == (4 if step else 5)
    B, H, P = q.shape[0], v.shape[-2], v.shape[-1]
    L = 1 if step else q.shape[1]
    R = q.shape[-3] if mimo else 1
    cu = inputs.cu_seqlens
    state = inputs.initial_state
    return Problem(
        batch=B,
        seqlen=L,
        nheads=H,
        ngroups=q.shape[-2],
        rank=R,
        d_state=q.shape[-1],
        headdim=P,
        n_angles=inputs.angles.shape[-1],
        nseq=B if cu is None else cu.shape[0] - 1,
        dtype=q.dtype,
        device_type=q.device.type,
        mimo=mimo,
        rotary=rotary if rotary is not None else ("halves" if mimo else "interleaved"),
        has_D=inputs.D is not None,
        has_z=inputs.z is not None,
        has_mimo_o=inputs.mimo_o is not None,
        has_initial_state=inputs.initial_state is not None,
        return_final_state=bool(return_final_state),
        varlen=cu is not None,
        decode=step,
        chunk_size=chunk_size,
        pooled=pooled,
        state_dtype=None if state is None else state.ssm.dtype,
    )


def check_scan_pool(
    problem: Problem, pool: Mamba3State, state_indices: torch.Tensor, device: torch.device
) -> Mamba3State:
    """A scan from pool slots: ``pool`` a state of slots (updated in place, so contiguous) and
    ``state_indices`` (nseq,) one slot per sequence (values checked as validate_step's)."""
    pool = _check_state("initial_state", pool, problem.nseq, problem.nheads, problem.headdim,
                        problem.d_state, problem.n_angles, problem.rank, device,
                        need_contiguous=True, pooled=True)  # fmt: skip
    _check_indices(_tensor("state_indices", state_indices), problem.nseq, device)
    if _check_values_enabled(device.type):
        _check_index_values(state_indices, pool.ssm.shape[0])
    return pool
