import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter. Set before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# CuTe DSL reads its target arch once, when it is first imported (by whichever test module comes
# first): the cute kernels' compile-only and host-JIT tests target Hopper.
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bash tests/run_gpu.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
