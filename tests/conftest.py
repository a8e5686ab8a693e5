"""Fixtures shared by several test modules."""

import os

import pytest


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    """One ONNX graph cache (``$CASC_ONNX_CACHE``) for the session: ``engine="onnxruntime"`` exports a model's
    graphs on first use, so every test after the first reuses them."""
    folder = tmp_path_factory.mktemp("onnx-cache")
    saved = os.environ.get("CASC_ONNX_CACHE")
    os.environ["CASC_ONNX_CACHE"] = str(folder)
    yield folder
    if saved is None:
        del os.environ["CASC_ONNX_CACHE"]
    else:
        os.environ["CASC_ONNX_CACHE"] = saved
