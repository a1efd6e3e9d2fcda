"""Settings: every SAFESUB_* variable's default, parsing and one-line error; go_offline."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safesub_core import settings
from safesub_core.errors import SafesubError

VARIABLES = ("SAFESUB_CACHE", "SAFESUB_CACHE_MAX_BYTES", "SAFESUB_ROOTS", "SAFESUB_FAMILY", "SAFESUB_SMOL_SIZE",
             "SAFESUB_DEVICE", "SAFESUB_DTYPE", "SAFESUB_LIVE_PROMPTS", "SAFESUB_RESIDENT_BYTES", "SAFESUB_JUDGE_URL",
             "SAFESUB_JUDGE_KEY")


@pytest.fixture()
def unset(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_every_variable_is_in_the_table():
    for name in VARIABLES:
        assert f"| {name} " in settings.__doc__, name


def test_defaults(unset):
    assert settings.cache_root() == settings.REPO / "cache"
    assert settings.cache_max_bytes() == 20 * 1024**3
    assert settings.roots() == [settings.REPO / "cache", Path.home()]
    assert settings.default_family() == "tiny" and settings.server_family() is None
    assert settings.smol_size() == "full"
    assert settings.device() is None and settings.dtype() is None
    assert settings.live_prompts() is None and settings.resident_bytes() is None
    assert settings.judge_url() is None and settings.judge_key() is None
    unset.delenv("OMP_NUM_THREADS", raising=False)
    assert settings.threads() == 1


def test_values_are_read_when_asked(unset, tmp_path):
    unset.setenv("SAFESUB_CACHE", str(tmp_path / "c"))
    unset.setenv("SAFESUB_CACHE_MAX_BYTES", "1e6")
    unset.setenv("SAFESUB_ROOTS", os.pathsep.join([str(tmp_path / "a"), "", str(tmp_path / "b")]))
    unset.setenv("SAFESUB_FAMILY", " fam.yaml ")
    unset.setenv("SAFESUB_LIVE_PROMPTS", "6")
    unset.setenv("SAFESUB_RESIDENT_BYTES", "1048576")
    unset.setenv("SAFESUB_JUDGE_URL", "http://127.0.0.1:9/v1")
    unset.setenv("OMP_NUM_THREADS", "2")
    assert settings.cache_root() == tmp_path / "c"
    assert settings.roots() == [tmp_path / "a", tmp_path / "b"]
    assert settings.cache_max_bytes() == 1_000_000 and settings.resident_bytes() == 1 << 20
    assert settings.default_family() == settings.server_family() == "fam.yaml"
    assert settings.live_prompts() == 6 and settings.judge_url() == "http://127.0.0.1:9/v1"
    assert settings.threads() == 2
    unset.setenv("SAFESUB_LIVE_PROMPTS", "auto")
    assert settings.live_prompts() is None
    unset.setenv("SAFESUB_FAMILY", "  ")  # blank: unset
    assert settings.default_family() == "tiny"


@pytest.mark.parametrize("name, value, call, message", [
    ("SAFESUB_CACHE_MAX_BYTES", "lots", settings.cache_max_bytes, "SAFESUB_CACHE_MAX_BYTES='lots': is not a number"),
    ("SAFESUB_RESIDENT_BYTES", "4G", settings.resident_bytes, "SAFESUB_RESIDENT_BYTES='4G': is not a number"),
    ("SAFESUB_LIVE_PROMPTS", "lots", settings.live_prompts, "SAFESUB_LIVE_PROMPTS 'lots': must be a whole number"),
    ("SAFESUB_LIVE_PROMPTS", "0", settings.live_prompts, "SAFESUB_LIVE_PROMPTS 0: must be at least 1"),
])
def test_a_bad_value_is_one_line_naming_the_variable(unset, name, value, call, message):
    unset.setenv(name, value)
    with pytest.raises(SafesubError) as e:
        call()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_go_offline_sets_only_what_is_unset(monkeypatch):
    for key in settings.OFFLINE:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    settings.go_offline()
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1" and os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_importing_the_package_changes_no_environment():
    code = "import os, safesub_core, safesub_core.settings; print(os.environ.get('HF_HUB_OFFLINE'))"
    env = {k: v for k, v in os.environ.items() if k not in settings.OFFLINE}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
