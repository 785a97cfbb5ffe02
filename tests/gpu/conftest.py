import pytest
import torch


def pytest_collection_modifyitems(items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA is not available on this machine")
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(skip)
