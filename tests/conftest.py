"""Shared parametrization: every op test runs on each available device and float dtype."""

import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[CUDA, pytest.mark.cuda])]
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=DTYPES)
def dtype(request):
    return request.param


@pytest.fixture
def tol(dtype):
    """(rtol, atol) for comparing a kernel with the reference in ``dtype``."""
    return {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6)}[dtype]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: threads cost more than they give there, and
    on a shared 2-core runner their spin-waiting slows the run many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
