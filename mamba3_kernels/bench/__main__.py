"""Entry point of ``python -m mamba3_kernels.bench`` (see :mod:`mamba3_kernels.bench.cli`)."""

import sys

from .cli import main

sys.exit(main())
