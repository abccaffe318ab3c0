"""Fixtures shared by the executor tests: one small random model per session and its AR reference."""
import pytest

from executor_helpers import PROMPT, REFERENCE_TOKENS, reference, small_model


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    pytest.importorskip("torch")
    return small_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def ref(ckpt):
    """The AR greedy continuation of PROMPT: REFERENCE_TOKENS tokens."""
    return reference(ckpt, PROMPT, REFERENCE_TOKENS)
