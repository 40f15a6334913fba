"""Shared test setup: on a machine without CUDA, Triton kernels run under its interpreter."""

import os
import tempfile

import pytest
import torch

# Tuned config files of this user's machine must not change what the tests run: the store reads
# the shipped files and this empty folder (tests that write files point it elsewhere).
os.environ["MAMBA3_KERNELS_CONFIG_DIR"] = tempfile.mkdtemp(prefix="mamba3-kernels-test-configs-")

if not torch.cuda.is_available():
    # Must be set before any Triton kernel module is imported (the decorator reads it).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def pin_config():
    """dispatch.pin for one test: ``pin_config("triton", "chunk_bwd", record_forward=0)``; every
    pin is dropped (and dispatch's memo cleared) when the test ends."""
    from mamba3_kernels import dispatch

    pinned = []

    def pin(backend: str, family: str, **fields):
        dispatch.pin(backend, family, **fields)
        pinned.append((backend, family))

    yield pin
    for backend, family in pinned:
        dispatch.unpin(backend, family)
