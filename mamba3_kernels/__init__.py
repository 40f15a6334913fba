"""mamba3-kernels: the Mamba-3 scan (trapezoidal, rotary, MIMO) with reference, Triton, TileLang and
CuTe DSL backends behind one op, ``torch.ops.mamba3.scan``.

    import mamba3_kernels
    out = mamba3_kernels.scan(q, k, v, adt, dt, trap, q_bias, k_bias, angles)
    out, state = mamba3_kernels.step(q1, k1, v1, adt1, dt1, trap1, q_bias, k_bias, angles1, state)
"""

import os as _os

# In a source checkout used without installing (PYTHONPATH at the repository root), the backend
# folders next to this package are its subpackages (an install maps them in pyproject.toml).
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "triton_impl", "__init__.py")):
    __path__.append(_root)  # noqa: F821  (a package's __path__)

from . import ops  # noqa: E402, F401  (registers torch.ops.mamba3.*)
from .api import scan, step
from .backend import register_backend, registered_backends
from .cute_impl import CuteBackend
from .info import info
from .reference import ReferenceBackend
from .state import Mamba3State
from .tilelang_impl import TileLangBackend
from .triton_impl import TritonBackend
from .verify import commit, verify

register_backend(ReferenceBackend())
register_backend(TritonBackend())
register_backend(TileLangBackend())
register_backend(CuteBackend())

__all__ = [
    "Mamba3State",
    "commit",
    "info",
    "register_backend",
    "registered_backends",
    "scan",
    "step",
    "verify",
]
__version__ = "0.1.0"
