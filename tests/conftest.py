"""Test session setup: two shared cores, so one thread; offline hub; a private cache folder per session."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder unless it sets SAFESUB_CACHE itself."""
    monkeypatch.setenv("SAFESUB_CACHE", str(tmp_path / "cache"))
    yield


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """The test-size built-in tiny family, built once per test session; returns its family.yaml Path."""
    from safesub_core.demo import build_tiny

    return build_tiny(tmp_path_factory.mktemp("demo") / "tiny", size="test", seed=0)


# ------------------------------------------------------------------------------------------------ the app (AppTest)
@pytest.fixture(scope="module")
def app_cache(tmp_path_factory):
    """One cache folder per test module, so its AppTest runs share scores (and, in-process, the resident session)."""
    return tmp_path_factory.mktemp("app_cache")


@pytest.fixture
def app_env(tiny_family, app_cache, tmp_path, monkeypatch):
    """The app on the test-size tiny family (SAFESUB_FAMILY), typed paths allowed under tmp_path only."""
    monkeypatch.setenv("SAFESUB_FAMILY", str(tiny_family))
    monkeypatch.setenv("SAFESUB_CACHE", str(app_cache))
    monkeypatch.setenv("SAFESUB_ROOTS", str(tmp_path))
    return tiny_family
