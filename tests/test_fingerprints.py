"""Fingerprints that persist: file hashes stored in the cache folder's index are reused by a restart (a cleared
in-process memo, or a new process) without hashing any weight file again; an edited file is hashed again; the
progress callback follows the hashing; a corrupt, foreign or unwritable index never breaks a fingerprint."""
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from factories import write_family
from safesub_core import hashing, settings
from safesub_core.checkpoints import Checkpoint
from safesub_core.errors import SafesubError
from safesub_core.family import Family
from safesub_core.fingerprints import fingerprint_all, model_fingerprint, tokenizer_fingerprint
from safesub_core.hashing import HASH_INDEX, HASH_INDEX_FORMAT, clear_hash_memo, hash_counts


def age(root: Path, seconds: int = 3600) -> None:
    """`root` (a file) or every file under it last modified `seconds` ago (older than RACY_NS: its hash may be
    stored)."""
    t = time.time_ns() - seconds * 10**9
    for f in [root] + list(root.rglob("*")):
        if f.is_file():
            os.utime(f, ns=(t, t))


@pytest.fixture()
def family(tmp_path) -> Family:
    write_family(tmp_path / "fam", variants=("useful", "harmful"))
    age(tmp_path / "fam")
    return Family.from_file(tmp_path / "fam" / "family.yaml")


def family_files(family: Family) -> set[str]:
    return {os.path.realpath(f) for c in family.checkpoints().values() for f in c.path.iterdir() if f.is_file()}


def hashed(fn):
    """(fn(), the number of files fn hashed)."""
    before = hash_counts()["files"]
    out = fn()
    return out, hash_counts()["files"] - before


def test_a_restart_hashes_no_file_whose_hash_is_stored(family):
    calls = []
    first, n = hashed(lambda: fingerprint_all(family, lambda done, total, what: calls.append((done, total, what))))
    files = family_files(family)
    assert n == len(files), "each file once (a config read by several fingerprints is hashed once)"
    total = sum(os.path.getsize(f) for f in files)
    assert calls[0][:2] == (0, total) and calls[-1][:2] == (total, total)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:])) and {c[1] for c in calls} == {total}
    assert any(what == "aligned: model.safetensors" for _, _, what in calls)
    assert first == {r: c.fingerprint(family) for r, c in family.checkpoints().items()}
    index = json.loads((settings.cache_root() / HASH_INDEX).read_text())
    assert index["format"] == HASH_INDEX_FORMAT and set(index["files"]) == files

    clear_hash_memo()  # a restart: the memory is gone, the index stays
    calls.clear()
    again, n = hashed(lambda: fingerprint_all(family, lambda *a: calls.append(a)))
    assert (again, n, calls) == (first, 0, [])
    prints = lambda: {r: (model_fingerprint(c, family), tokenizer_fingerprint(c, family))  # noqa: E731
                      for r, c in family.checkpoints().items()}
    assert hashed(prints)[1] == 0


def test_an_edited_weight_file_is_hashed_again(family):
    first = fingerprint_all(family)
    f = family.checkpoint("harmful").path / "model.safetensors"
    state = load_file(f)
    state["model.norm.weight"] += 1
    save_file(state, f, metadata={"format": "pt"})
    age(f)
    clear_hash_memo()
    after, n = hashed(lambda: fingerprint_all(family))
    assert n == 1
    assert after["harmful"] != first["harmful"] and {k: v for k, v in after.items() if k != "harmful"} == \
        {k: v for k, v in first.items() if k != "harmful"}
    # touched (same content, new mtime and ctime): hashed again, the same fingerprint
    age(f, seconds=7200)
    assert hashed(lambda: fingerprint_all(family)) == (after, 1)


def test_a_new_process_hashes_nothing_again(family, tmp_path):
    fingerprint_all(family)
    code = ("import json, sys; from safesub_core.fingerprints import fingerprint_all; "
            "from safesub_core.hashing import hash_counts; from safesub_core.family import Family; "
            "f = Family.from_file(sys.argv[1]); "
            "print(json.dumps([fingerprint_all(f), hash_counts()['files']]))")
    env = dict(os.environ, SAFESUB_CACHE=str(settings.cache_root()))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fam" / "family.yaml")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    prints, n = json.loads(out.stdout.strip().splitlines()[-1])
    assert n == 0 and prints == fingerprint_all(family)


def test_a_file_changed_moments_ago_is_not_stored(tmp_path):
    write_family(tmp_path / "fam", variants=("useful",))
    ck = Checkpoint.resolve("useful", tmp_path / "fam" / "useful")
    ck.fingerprint()
    assert not (settings.cache_root() / HASH_INDEX).exists()
    assert hashed(ck.fingerprint)[1] == len(ck._tensor_files())  # racy: hashed afresh every time


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe", json.dumps([1, 2]).encode(),
                                     json.dumps({"format": "another tool", "files": {}}).encode(),
                                     None])
def test_a_corrupt_or_foreign_index_is_ignored_and_rebuilt(family, content):
    first = fingerprint_all(family)
    index = settings.cache_root() / HASH_INDEX
    if content is None:  # the right format, entries of the wrong shape (and a lie about a file's hash)
        doc = json.loads(index.read_text())
        real, entry = next(iter(doc["files"].items()))
        doc["files"] = {real: entry[:4] + ["0" * 63 + "x"], "other": "x", "more": [1, 2, 3, 4, 5]}
        content = json.dumps(doc).encode()
    index.write_bytes(content)
    clear_hash_memo()
    again, n = hashed(lambda: fingerprint_all(family))
    assert again == first and n == len(family_files(family))
    assert set(json.loads(index.read_text())["files"]) == family_files(family)


def test_an_unwritable_cache_only_stops_hashes_being_stored(family, tmp_path, monkeypatch, caplog):
    not_a_folder = tmp_path / "cache_file"
    not_a_folder.write_text("a file where the cache folder should be")
    monkeypatch.setenv("SAFESUB_CACHE", str(not_a_folder))
    with caplog.at_level(logging.WARNING, logger=hashing.__name__):
        prints = fingerprint_all(family)
    assert prints["aligned"] == family.aligned.fingerprint()
    assert sum("not stored" in r.message for r in caplog.records) == 1  # one warning, not one a file
    clear_hash_memo()
    assert hashed(lambda: fingerprint_all(family)) == (prints, len(family_files(family)))


def test_fingerprint_follows_its_own_hashing(family):
    ck = family.checkpoint("useful")
    calls = []
    fp = ck.fingerprint(family, progress=lambda *a: calls.append(a))
    size = sum(os.path.getsize(f) for f in ck._tensor_files())
    assert calls[0][:2] == (0, size) and calls[-1][:2] == (size, size)
    clear_hash_memo()
    calls.clear()
    assert ck.fingerprint(family, progress=lambda *a: calls.append(a)) == fp and calls == []


def test_a_missing_file_is_one_line(family):
    f = family.checkpoint("useful").path / "model.safetensors"
    with pytest.raises(SafesubError) as err:
        hashing.file_sha256(f.with_name("gone.safetensors"))
    assert "cannot be read" in str(err.value) and "\n" not in str(err.value)
