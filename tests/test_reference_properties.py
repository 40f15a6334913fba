"""Property tests: on random valid shapes and options, the two reference forms agree."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba3_kernels.reference import reference_scan
from mamba3_kernels.testing import random_inputs, rel_err

EXACT = 1e-10


@st.composite
def scan_calls(draw):
    """Keyword arguments of random_inputs for a random valid call, plus rotary and chunk size."""
    mimo = draw(st.booleans())
    rank = draw(st.sampled_from([1, 2, 4])) if mimo else 1
    ngroups = draw(st.sampled_from([1, 2]))
    d_state = draw(st.sampled_from([4, 8, 16]))
    kw = dict(
        nheads=ngroups * draw(st.sampled_from([1, 2])),
        ngroups=ngroups,
        d_state=d_state,
        headdim=draw(st.sampled_from([1, 2, 4])),
        n_angles=draw(st.integers(0, d_state // 2)),
        rank=rank,
        mimo=mimo,
        dtype=torch.float64,
        with_D=draw(st.booleans()),
        with_z=draw(st.booleans()),
        with_mimo_o=draw(st.booleans()),
        with_initial_state=draw(st.booleans()),
        generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1))),
    )
    if draw(st.booleans()):  # varlen: sequence lengths, zeros allowed
        lengths = draw(st.lists(st.integers(0, 9), min_size=1, max_size=4))
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        kw["cu_seqlens"] = bounds
    else:
        kw["batch"] = draw(st.integers(1, 2))
        kw["seqlen"] = draw(st.integers(0, 24))
    rotary = draw(st.sampled_from(["interleaved", "halves"]))
    chunk = draw(st.integers(1, 32))
    return kw, rotary, chunk


@settings(max_examples=25, deadline=None)
@given(scan_calls())
def test_forms_agree(call):
    kw, rotary, chunk = call
    inp = random_inputs(**kw)
    out_r, state_r = reference_scan(inp, rotary)
    out_c, state_c = reference_scan(inp, rotary, chunk_size=chunk)
    assert out_r.shape == out_c.shape
    assert torch.isfinite(out_r).all()
    assert rel_err(out_c, out_r) < EXACT
    for a, b in zip(state_c, state_r, strict=True):
        assert a.shape == b.shape
        assert rel_err(a, b) < EXACT


@settings(max_examples=25, deadline=None)
@given(scan_calls(), st.integers(0, 24))
def test_split_point_does_not_matter(call, cut):
    """Scanning [0, cut) then [cut, L) from the carried state equals one call (non-varlen)."""
    kw, rotary, chunk = call
    kw.pop("cu_seqlens", None)
    kw.setdefault("seqlen", 24)
    inp = random_inputs(**kw)
    cut = min(cut, inp.v.shape[1])
    out, state = reference_scan(inp, rotary, chunk_size=chunk)

    o1, s1 = reference_scan(inp.tokens(0, cut, inp.initial_state), rotary, chunk_size=chunk)
    o2, s2 = reference_scan(inp.tokens(cut, inp.v.shape[1], s1), rotary)
    assert rel_err(torch.cat((o1, o2), dim=1), out) < EXACT
    for a, b in zip(s2, state, strict=True):
        assert rel_err(a, b) < EXACT
