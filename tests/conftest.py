import os
import tempfile

import pytest
import torch

# A fresh inductor cache per test session: a cache left by an older checkout (custom-op fake
# kernels that have since changed) must never decide a test.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="snlp-inductor-"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from scratch and with a fixed seed."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
