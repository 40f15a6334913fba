"""A stand-in for Triton's GPU driver on a machine without one: Triton's JIT can then compile
(``warmup``) kernels for sm_90 with the specializations real launches would get, as long as
nothing is launched. Used by tools/first_call_compile.py, tools/host_time_bwd_jit.py and
tests/test_triton_launch.py."""

from __future__ import annotations

from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class StandInDriver:
    """What the JIT asks a driver for when it compiles: the target, the device and its stream."""

    def __init__(self, arch: int = 90) -> None:
        self.target = GPUTarget("cuda", arch, 64)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def install(arch: int = 90) -> None:
    """Make the stand-in Triton's active driver (for this process)."""
    driver.set_active(StandInDriver(arch))
