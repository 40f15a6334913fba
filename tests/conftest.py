"""Shared test setup: on a machine without CUDA, Triton kernels run under its interpreter."""

import os

import pytest
import torch

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
