"""Suite-wide test settings."""

import sys

import pytest


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run torch on one intra-op thread: the tests' tiny models gain nothing from more, results stay
    deterministic, and on a shared 2-core machine oversubscribed threads were measured 10x slower.

    Session-scoped so that module-scoped fixtures (reference outputs) run on the same thread count as the tests
    comparing against them: float reductions, and so output bytes, depend on it."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
