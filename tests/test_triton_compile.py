"""Triton kernels compile for Hopper (sm_90) without a GPU.

Compilation runs in a fresh interpreter with TRITON_INTERPRET=0: under the interpreter the
kernels are not JIT functions and cannot be handed to the compiler.
"""

import subprocess
import sys
import textwrap

from mamba3_kernels.testing import run_compiled

# Compiles the chunked forward kernel at the model shape (bf16, H=64, N=128, P=64, S=32) for SISO
# and MIMO R=4, with every optional input on, as a launch would specialise it.
_CHUNK_FWD_SM90 = textwrap.dedent(
    """
    import dataclasses

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
        # The sequential kernel (varlen calls and many-sequence SISO take it by default).
        config = cf.with_split(problem, cf.default_config(problem), 0)
        assert cf.constraint(problem, config, None) is None
        kernel = cf.compile_kernel(problem, config)
        ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
        assert ".target sm_90" in ptx, ptx[:400]
        assert len(cubin) > 1000
        # The chunk products run on the tensor cores (Hopper wgmma or mma.sync).
        assert "wgmma" in ptx or "mma.sync" in ptx
        print("ok", rank, len(ptx), len(cubin))
        # The chunk-parallel variant: three kernels, the per-chunk ones on the tensor cores.
        split = dataclasses.replace(config, split=1, segment=4 * config.chunk_size)
        kernels = cf.compile_kernel(problem, split)
        assert set(kernels) == {"_segment_state_kernel", "_state_pass_kernel", "_chunk_fwd_kernel"}
        for name, kernel in kernels.items():
            assert ".target sm_90" in kernel.asm["ptx"] and len(kernel.asm["cubin"]) > 1000
        for name in ("_segment_state_kernel", "_chunk_fwd_kernel"):
            ptx = kernels[name].asm["ptx"]
            assert "wgmma" in ptx or "mma.sync" in ptx, name
            assert ("prefetch.global.L2" in ptx) == (config.prefetch > 0), name
        if rank == 1:
            # The L2 prefetch (off by default): its requests in both chunk loops when asked for.
            pre = cf.compile_kernel(problem, dataclasses.replace(split, prefetch=1))
            for name in ("_segment_state_kernel", "_chunk_fwd_kernel"):
                assert "prefetch.global.L2" in pre[name].asm["ptx"], name
        print("split", rank)
        # The block-parallel variant: the block kernel replaces the segment walk.
        blocks = dataclasses.replace(config, split=2, chunk_size=64 // rank, block_p=64,
                                     num_warps=4, segment=128 // rank)  # fmt: skip
        assert cf.constraint(problem, blocks, None) is None
        kernels = cf.compile_kernel(problem, blocks)
        assert set(kernels) == {"_segment_state_kernel", "_state_pass_kernel", "_block_out_kernel"}
        ptx = kernels["_block_out_kernel"].asm["ptx"]
        assert ".target sm_90" in ptx and ("wgmma" in ptx or "mma.sync" in ptx)
        print("blocks", rank)
        # A training forward's build, which also stores the core's y for the backward: the
        # kernel that writes the outputs gains stores (SISO: the walk; MIMO: the block kernel).
        name, cfg = (("_chunk_fwd_kernel", config) if rank == 1
                     else ("_block_out_kernel", blocks))  # fmt: skip
        plain = cf.compile_kernel(problem, cfg)
        plain = plain[name] if isinstance(plain, dict) else plain
        saving = cf.compile_kernel(problem, cfg, save_y=True)
        saving = saving[name] if isinstance(saving, dict) else saving
        count = [k.asm["ptx"].count("st.global") for k in (plain, saving)]
        assert count[1] > count[0], count
        print("save_y", rank, count)
    """
)


def test_chunk_fwd_compiles_for_sm90_without_gpu():
    out = run_compiled(_CHUNK_FWD_SM90)
    assert out.count("ok") == 2
    assert out.count("split") == 2
    assert out.count("blocks") == 2


_SMEM_FIT = textwrap.dedent(
    """
    import dataclasses

    import torch
    from mamba3_kernels.problem import Problem
    from mamba3_kernels.triton_impl import chunk_fwd as cf

    # Every supported size gets a default whose shared-memory estimate fits an sm_90 block, and
    # the compiler agrees for the largest tiles (fp32, N=256, P=128: once over the limit).
    for dtype in (torch.bfloat16, torch.float32):
        for n in (64, 128, 256):
            for p in (32, 64, 128):
                for rank in (1, 2, 4, 8):
                    for batch in (1, 64):
                        problem = Problem(
                            batch=batch, seqlen=4096, nheads=8, ngroups=1, rank=rank, d_state=n,
                            headdim=p, n_angles=n // 4, nseq=batch, dtype=dtype,
                            device_type="cuda", mimo=rank > 1, rotary="halves",
                            has_D=True, has_z=True, has_mimo_o=rank > 1,
                            has_initial_state=False, return_final_state=False, varlen=False,
                        )
                        cfg = cf.default_config(problem)
                        props = {"shared_memory_per_block_optin": 232448}
                        assert cf.constraint(problem, cfg, props) is None, (problem, cfg)
    problem = Problem(
        batch=1, seqlen=4096, nheads=8, ngroups=1, rank=1, d_state=256, headdim=128,
        n_angles=64, nseq=1, dtype=torch.float32, device_type="cuda", mimo=False,
        rotary="interleaved", has_D=True, has_z=True, has_mimo_o=False,
        has_initial_state=True, return_final_state=True, varlen=False,
    )
    config = cf.default_config(problem)
    for cfg in (config, dataclasses.replace(config, split=0, segment=0)):
        kernels = cf.compile_kernel(problem, cfg)
        for kernel in kernels.values() if isinstance(kernels, dict) else [kernels]:
            assert kernel.metadata.shared <= 232448, kernel.metadata.shared
    print("ok")
    """
)


def test_chunk_fwd_defaults_fit_shared_memory():
    out = run_compiled(_SMEM_FIT)
    assert "ok" in out


def test_kernel_resources_report(tmp_path):
    """tools/kernel_resources.py (registers, stack, instructions of the sm_90 builds, read by
    Triton's cuobjdump) runs without a GPU and reports every kernel of a split=1 SISO call."""
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "kernel_resources.py"
    out = tmp_path / "res.json"
    res = subprocess.run(
        [sys.executable, str(script), "--cases", "siso_1x2048", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    kernels = json.loads(out.read_text())["cases"]["siso_1x2048"]["kernels"]
    assert set(kernels) == {"_segment_state_kernel", "_state_pass_kernel", "_chunk_fwd_kernel"}
    for r in kernels.values():
        assert 16 <= r["registers"] <= 255 and r["stack"] >= 0
        assert r["instructions"] > 100
