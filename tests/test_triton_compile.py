"""Triton kernels compile for Hopper (sm_90) without a GPU.

Compilation runs in a fresh interpreter with TRITON_INTERPRET=0: under the interpreter the
kernels are not JIT functions and cannot be handed to the compiler.
"""

import os
import subprocess
import sys
import textwrap

# Compiles the chunked forward kernel at the model shape (bf16, H=64, N=128, P=64, S=32) for SISO
# and MIMO R=4, with every optional input on, as a launch would specialise it.
_CHUNK_FWD_SM90 = textwrap.dedent(
    """
    import torch
    from mamba3_kernels.problem import Problem
    from mamba3_kernels.triton_impl import chunk_fwd as cf

    for rank, rotary in ((1, "interleaved"), (4, "halves")):
        problem = Problem(
            batch=1, seqlen=16384, nheads=64, ngroups=1, rank=rank, d_state=128, headdim=64,
            n_angles=32, nseq=1, dtype=torch.bfloat16, device_type="cuda", mimo=rank > 1,
            rotary=rotary, has_D=True, has_z=True, has_mimo_o=rank > 1, has_initial_state=True,
            return_final_state=True, varlen=False,
        )
        config = cf.default_config(problem)
        assert cf.constraint(problem, config, None) is None
        kernel = cf.compile_kernel(problem, config)
        ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
        assert ".target sm_90" in ptx, ptx[:400]
        assert len(cubin) > 1000
        # The chunk products run on the tensor cores (Hopper wgmma or mma.sync).
        assert "wgmma" in ptx or "mma.sync" in ptx
        print("ok", rank, len(ptx), len(cubin))
    """
)


def test_chunk_fwd_compiles_for_sm90_without_gpu():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run(
        [sys.executable, "-c", _CHUNK_FWD_SM90],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("ok") == 2
