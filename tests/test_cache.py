"""safesub_core.cache: round trips, compute-once, checksums, atomic failures, read-only folders, LRU, locking."""
import errno
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import safesub_core.cache.store as cache_mod
from safesub_core.cache import DiskCache, cache_root
from safesub_core.errors import SafesubError

REPO = Path(__file__).resolve().parent.parent


def files_under(folder: Path) -> list[Path]:
    """Every file under `folder` except the (kept, empty) lock files."""
    if not folder.exists():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and ".locks" not in p.parts)


def entry_paths(cache: DiskCache, ns: str, parts: dict) -> tuple[Path, Path]:
    key = cache.key(ns, parts)
    folder = cache.root / ns / key[:2]
    sidecar = folder / f"{key}.json"
    payload = folder / json.loads(sidecar.read_text())["payload"]
    return payload, sidecar


class Counter:
    def __init__(self, value, delay: float = 0.0):
        self.value, self.delay, self.calls = value, delay, 0
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        return self.value


# ------------------------------------------------------------------------------------------ roots and keys


def test_cache_root_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFESUB_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"
    assert DiskCache().root == tmp_path / "elsewhere"
    monkeypatch.delenv("SAFESUB_CACHE")
    assert cache_root() == REPO / "cache"


def test_max_bytes_from_env(monkeypatch, tmp_path):
    assert DiskCache(tmp_path).max_bytes == 20 * 1024**3
    monkeypatch.setenv("SAFESUB_CACHE_MAX_BYTES", "12345")
    assert DiskCache(tmp_path).max_bytes == 12345
    assert DiskCache(tmp_path, max_bytes=7).max_bytes == 7
    monkeypatch.setenv("SAFESUB_CACHE_MAX_BYTES", "lots")
    with pytest.raises(SafesubError, match="SAFESUB_CACHE_MAX_BYTES"):
        DiskCache(tmp_path)


def test_key_canonical_and_strict():
    k = DiskCache.key
    assert k("svd", {"a": 1, "b": [1, 2]}) == k("svd", {"b": (1, 2), "a": 1})  # key order, tuple == list
    assert len(k("svd", {})) == 64
    assert k("svd", {"a": 1}) != k("overlap", {"a": 1})
    assert len({k("svd", {"a": v}) for v in (1, 1.0, True, "1", None)}) == 5
    for bad in ({"a": object()}, {"a": np.int64(3)}, {"a": Path("x")}, {"a": {1: "x"}}, {"a": [b"x"]}):
        with pytest.raises(TypeError, match="cache key part"):
            k("svd", bad)


# ------------------------------------------------------------------------------------------ round trips


def test_tensor_dict_round_trip_exact(tmp_path):
    cache = DiskCache(tmp_path)
    base = torch.randn(4, 6, dtype=torch.float64)
    value = {
        "f32": torch.randn(3, 5),
        "f64": base,
        "view_t": base.T,  # non-contiguous view sharing memory with f64
        "bf16": torch.randn(7).to(torch.bfloat16),
        "f16": torch.tensor([1e-4, -0.0, float("inf"), float("nan")], dtype=torch.float16),
        "i64": torch.tensor([-(2**63), 2**63 - 1]),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "grad": torch.ones(2, requires_grad=True) * 2,
    }
    returned = cache.get_or_compute("svd", {"model": "tiny", "rank": 4}, lambda: value)
    got = cache.get("svd", {"model": "tiny", "rank": 4})
    for out in (returned, got):
        assert set(out) == set(value)
        for name, t in value.items():
            assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
            assert out[name].is_contiguous() and not out[name].requires_grad
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8)  # bitwise: NaN, -0.0 included
            assert torch.equal(out[name].reshape(-1).view(torch.uint8), raw), name
    payload, sidecar = entry_paths(cache, "svd", {"model": "tiny", "rank": 4})
    assert payload.suffix == ".safetensors"
    meta = json.loads(sidecar.read_text())
    assert meta["type"] == "tensors" and meta["size"] == payload.stat().st_size
    assert meta["parts"] == {"model": "tiny", "rank": 4} and len(meta["sha256"]) == 64 and meta["created"]


def sample_frame() -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "i64": [1, -(2**62), 3],
            "f64": [0.1 + 0.2, float("nan"), -0.0],
            "inf": [float("inf"), float("-inf"), 1e-310],
            "f32": np.array([1.1, 2.5, -3.3], dtype=np.float32),
            "u64": np.array([2**64 - 1, 0, 7], dtype=np.uint64),
            "bool": [True, False, True],
            "str": ["refusal", None, "héllo \"quoted\"\n"],
            "string": pd.array(["a", None, "c"], dtype="string"),
            "Int64": pd.array([1, None, 3], dtype="Int64"),
            "boolean": pd.array([True, None, False], dtype="boolean"),
        },
        index=pd.Index(["p0", "p1", "p2"], name="prompt"),
    )
    df["object"] = pd.Series(["x", 3, None], dtype=object, index=df.index)
    return df


def test_dataframe_round_trip_dtypes(tmp_path):
    cache = DiskCache(tmp_path)
    df = sample_frame()
    returned = cache.put("scores", {"set": "harmful"}, df)
    got = cache.get("scores", {"set": "harmful"})
    for out in (returned, got):
        pd.testing.assert_frame_equal(out, df, check_exact=True)
        assert out.dtypes.equals(df.dtypes)
        assert out.index.dtype == df.index.dtype and out.index.name == "prompt"
        assert math.copysign(1.0, out["f64"].iloc[2]) == -1.0  # -0.0 survives
        assert out["f64"].iloc[0] == 0.1 + 0.2 and out["inf"].iloc[2] == 1e-310  # exact floats
        assert [type(v) for v in out["object"].iloc[:2]] == [str, int]
    payload, _ = entry_paths(cache, "scores", {"set": "harmful"})
    assert payload.name.endswith(".frame.json")
    assert b"pickle" not in payload.read_bytes() and json.loads(payload.read_bytes())  # plain JSON


def test_dataframe_round_trip_shapes(tmp_path):
    cache = DiskCache(tmp_path)
    frames = {
        "empty": pd.DataFrame(),
        "range": pd.DataFrame({"rank": [1, 2, 4], "kl": [0.5, 0.25, 0.125]}),
        "int_cols": pd.DataFrame(np.eye(2), columns=[10, 20]),
        "multi": pd.DataFrame(
            {("layer0", "mso"): [0.1, 0.2], ("layer1", "mso"): [0.3, 0.4]},
            index=pd.MultiIndex.from_arrays([["tiny", "tiny"], [1, 2]], names=["family", "rank"]),
        ),
        "dup_cols": pd.DataFrame([[1, "a"]], columns=["x", "x"]),
    }
    for name, df in frames.items():
        out = cache.put("frames", {"name": name}, df)
        pd.testing.assert_frame_equal(cache.get("frames", {"name": name}), df, check_exact=True)
        pd.testing.assert_frame_equal(out, df, check_exact=True)


def test_dataframe_unsupported_dtype_raises_and_stores_nothing(tmp_path):
    cache = DiskCache(tmp_path)
    for df in (pd.DataFrame({"c": pd.Categorical(["a", "b"])}),
               pd.DataFrame({"t": pd.to_datetime(["2024-01-01"])}),
               pd.DataFrame({"o": [object()]})):
        with pytest.raises(TypeError, match="DataFrame"):
            cache.put("frames", {"x": 1}, df)
    assert files_under(tmp_path) == []


def test_json_round_trip(tmp_path):
    cache = DiskCache(tmp_path)
    value = {"acc": 0.1 + 0.2, "nan": float("nan"), "rows": [1, "two", None, True, {"x": [1.5e-300]}],
             "tuple": (1, 2), "np": np.float32(0.5), "unicode": "refus ✓"}
    returned = cache.get_or_compute("scores", {"k": 1}, lambda: value)
    got = cache.get("scores", {"k": 1})
    for out in (returned, got):
        assert out["acc"] == 0.1 + 0.2 and math.isnan(out["nan"])
        assert out["rows"] == [1, "two", None, True, {"x": [1.5e-300]}]
        assert out["tuple"] == [1, 2] and out["np"] == 0.5 and out["unicode"] == "refus ✓"
    assert cache.put("scores", {"k": 2}, [1, 2]) == [1, 2] == cache.get("scores", {"k": 2})
    assert cache.put("scores", {"k": 3}, {}) == {} == cache.get("scores", {"k": 3})


def test_bad_values_raise_type_error(tmp_path):
    cache = DiskCache(tmp_path)
    for bad in ("text", 3, None, {"t": torch.ones(1), "x": 1}, {"x": object()}, torch.ones(2)):
        with pytest.raises(TypeError, match="cache value"):
            cache.put("v", {"k": 1}, bad)
    assert files_under(tmp_path) == []
    with pytest.raises(ValueError, match="namespace"):
        cache.put("../escape", {"k": 1}, [1])


def test_get_absent_is_none(tmp_path):
    assert DiskCache(tmp_path / "never_made").get("svd", {"a": 1}) is None
    assert not (tmp_path / "never_made").exists()


def test_put_replaces_entry(tmp_path):
    cache = DiskCache(tmp_path)
    cache.put("v", {"k": 1}, {"t": torch.ones(2)})
    cache.put("v", {"k": 1}, [1, 2, 3])
    assert cache.get("v", {"k": 1}) == [1, 2, 3]
    assert len(files_under(tmp_path)) == 2  # old .safetensors payload gone


# ------------------------------------------------------------------------------------------ compute once, checksums


def test_compute_called_once(tmp_path):
    cache = DiskCache(tmp_path)
    compute = Counter({"w": torch.arange(3.0)})
    for _ in range(3):
        assert torch.equal(cache.get_or_compute("svd", {"a": 1}, compute)["w"], torch.arange(3.0))
    assert compute.calls == 1
    cache.get_or_compute("svd", {"a": 2}, compute)
    assert compute.calls == 2
    assert DiskCache(tmp_path).get_or_compute("svd", {"a": 1}, compute)["w"].tolist() == [0, 1, 2]  # new instance
    assert compute.calls == 2


@pytest.mark.parametrize("value", [{"w": torch.randn(16, 8)}, [0.5] * 50, pd.DataFrame({"x": range(20)})],
                         ids=["tensors", "json", "dataframe"])
def test_corrupt_payload_is_detected_and_recomputed(tmp_path, caplog, value):
    cache = DiskCache(tmp_path)
    cache.put("proj", {"a": 1}, value)
    payload, _ = entry_paths(cache, "proj", {"a": 1})
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte in the middle of the payload
    payload.write_bytes(bytes(data))
    compute = Counter(value)
    with caplog.at_level(logging.WARNING, logger="safesub_core.cache"):
        out = cache.get_or_compute("proj", {"a": 1}, compute)
    assert compute.calls == 1
    assert "checksum" in caplog.text
    if isinstance(value, dict):
        assert torch.equal(out["w"], value["w"])
    elif isinstance(value, pd.DataFrame):
        pd.testing.assert_frame_equal(out, value)
    else:
        assert out == value
    cache.get_or_compute("proj", {"a": 1}, compute)  # healthy again: a hit
    assert compute.calls == 1


def test_missing_payload_or_broken_sidecar_reads_as_absent(tmp_path, caplog):
    cache = DiskCache(tmp_path)
    cache.put("proj", {"a": 1}, [1])
    payload, sidecar = entry_paths(cache, "proj", {"a": 1})
    payload.unlink()
    with caplog.at_level(logging.WARNING, logger="safesub_core.cache"):
        assert cache.get("proj", {"a": 1}) is None
    assert not sidecar.exists() and "missing" in caplog.text
    cache.put("proj", {"a": 2}, [2])
    _, sidecar = entry_paths(cache, "proj", {"a": 2})
    sidecar.write_text("{not json")
    assert cache.get_or_compute("proj", {"a": 2}, lambda: [3]) == [3]
    assert cache.get("proj", {"a": 2}) == [3]


def test_compute_raising_leaves_no_files(tmp_path):
    cache = DiskCache(tmp_path)

    def boom():
        raise RuntimeError("model exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        cache.get_or_compute("svd", {"a": 1}, boom)
    assert files_under(tmp_path) == []
    assert cache.get("svd", {"a": 1}) is None
    assert cache.get_or_compute("svd", {"a": 1}, lambda: [1]) == [1]


# ------------------------------------------------------------------------------------------ failing writes


def partial_then_enospc(path, *args):
    Path(path).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("writer,value", [("_write_bytes", {"score": 1.0}), ("_write_tensors", {"w": torch.ones(3)})],
                         ids=["json", "tensors"])
def test_enospc_raises_safesub_error_and_leaves_nothing(tmp_path, monkeypatch, writer, value):
    cache = DiskCache(tmp_path / "c")
    cache.put("other", {"k": 0}, [0])  # an existing entry must survive
    before = files_under(cache.root)
    compute = Counter(value)
    with monkeypatch.context() as m:
        m.setattr(cache_mod, writer, partial_then_enospc)
        with pytest.raises(SafesubError) as info:
            cache.get_or_compute("svd", {"a": 1}, compute)
    msg = str(info.value)
    assert "\n" not in msg and str(cache.root) in msg and "no space left" in msg
    assert files_under(cache.root) == before  # no temporary, no payload, no sidecar
    assert cache.get("svd", {"a": 1}) is None
    out = cache.get_or_compute("svd", {"a": 1}, compute)  # disk has room again: rerun succeeds
    assert compute.calls == 2 and cache.get("svd", {"a": 1}).keys() == out.keys()


def test_sidecar_write_failure_removes_committed_payload(tmp_path, monkeypatch):
    cache = DiskCache(tmp_path)
    real = cache_mod._write_bytes

    def fail_sidecar(path, data):
        if Path(path).name.split(".")[2] == "json":  # ".<key>.json.<rand>.tmp": the sidecar
            partial_then_enospc(path)
        real(path, data)

    monkeypatch.setattr(cache_mod, "_write_bytes", fail_sidecar)
    with pytest.raises(SafesubError, match="no space left"):
        cache.put("svd", {"a": 1}, {"w": torch.ones(3)})  # payload (safetensors) is written, then the sidecar fails
    assert files_under(tmp_path) == []


def test_root_is_a_file(tmp_path):
    blocker = tmp_path / "cachefile"
    blocker.write_text("not a folder")
    cache = DiskCache(blocker)
    compute = Counter([1])
    with pytest.raises(SafesubError, match=f"cache folder {blocker}: is not a folder"):
        cache.get_or_compute("svd", {"a": 1}, compute)
    assert compute.calls == 0
    assert cache.get("svd", {"a": 1}) is None and cache.info().empty and cache.clear() == 0


def test_read_only_folder_simulated(tmp_path, monkeypatch):
    """As root, chmod does not stop writes, so simulate a read-only folder (EROFS answers os.access too)."""
    cache = DiskCache(tmp_path / "ro")
    cache.put("svd", {"a": 1}, [1])
    before = files_under(cache.root)
    real_access = os.access
    monkeypatch.setattr(cache_mod.os, "access",
                        lambda p, mode, **kw: False if mode & os.W_OK and Path(p) == cache.root
                        else real_access(p, mode, **kw))
    compute = Counter([2])
    with pytest.raises(SafesubError) as info:
        cache.get_or_compute("svd", {"a": 2}, compute)
    assert str(info.value) == f"cache folder {cache.root}: is read-only (set SAFESUB_CACHE to a writable folder)"
    assert compute.calls == 0  # failed before wasting the compute
    with pytest.raises(SafesubError, match="read-only"):
        cache.put("svd", {"a": 3}, [3])
    assert cache.get("svd", {"a": 1}) == [1]  # reads still work
    assert cache.get_or_compute("svd", {"a": 1}, compute) == [1]
    assert files_under(cache.root) == before


def test_read_only_write_error_mapped(tmp_path, monkeypatch):
    """An EROFS from the filesystem in the middle of a write is reported the same way and cleaned up."""
    cache = DiskCache(tmp_path)

    def erofs(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(cache_mod, "_write_bytes", erofs)
    with pytest.raises(SafesubError, match="is read-only"):
        cache.put("svd", {"a": 1}, [1])
    assert files_under(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions; see test_read_only_folder_simulated")
def test_read_only_folder_chmod(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        with pytest.raises(SafesubError, match="is read-only"):
            DiskCache(root).get_or_compute("svd", {"a": 1}, lambda: [1])
    finally:
        root.chmod(0o755)


# ------------------------------------------------------------------------------------------ LRU eviction


def test_lru_eviction_order(tmp_path):
    big = DiskCache(tmp_path)
    big.put("ns", {"i": "probe"}, list(range(1000)))
    entry = int(big.info()["bytes"].sum())
    big.clear()

    cache = DiskCache(tmp_path, max_bytes=int(2.5 * entry))
    value = list(range(1000))
    cache.put("ns", {"i": "a"}, value)
    cache.put("ns", {"i": "b"}, value)
    assert cache.get("ns", {"i": "a"}) == value  # a is now more recently used than b
    cache.put("ns", {"i": "c"}, value)  # over the cap: evict the LRU entry, b
    assert cache.get("ns", {"i": "b"}) is None
    assert int(cache.info()["entries"].sum()) == 2
    assert cache.get("ns", {"i": "c"}) == value  # order of use now: a, c
    cache.put("ns", {"i": "d"}, value)  # evicts a
    assert cache.get("ns", {"i": "a"}) is None
    assert cache.get("ns", {"i": "c"}) == value and cache.get("ns", {"i": "d"}) == value
    assert int(cache.info()["bytes"].sum()) <= cache.max_bytes


def test_entry_larger_than_cap_is_kept(tmp_path):
    cache = DiskCache(tmp_path, max_bytes=10)
    cache.put("ns", {"i": 1}, [1])
    cache.get_or_compute("ns", {"i": 2}, lambda: list(range(100)))
    assert cache.get("ns", {"i": 1}) is None
    assert cache.get("ns", {"i": 2}) == list(range(100))  # never evict the entry just written


# ------------------------------------------------------------------------------------------ info and clear


def test_info_and_clear_counts(tmp_path):
    cache = DiskCache(tmp_path)
    info = cache.info()
    assert list(info.columns) == ["namespace", "entries", "bytes"] and info.empty
    cache.put("svd", {"a": 1}, {"w": torch.ones(4)})
    cache.put("svd", {"a": 2}, [1])
    cache.put("scores", {"a": 1}, pd.DataFrame({"x": [1]}))
    info = cache.info().set_index("namespace")
    assert info.loc["svd", "entries"] == 2 and info.loc["scores", "entries"] == 1
    assert info.loc["svd", "bytes"] == sum(p.stat().st_size for p in files_under(tmp_path / "svd"))
    sub = next(p for p in (tmp_path / "svd").iterdir())
    (sub / f".{'0' * 64}.json.dead.tmp").write_bytes(b"x")  # a temporary left by a killed process
    assert cache.clear("svd") == 2
    assert list(cache.info()["namespace"]) == ["scores"]
    assert cache.get("svd", {"a": 1}) is None and not (tmp_path / "svd").exists()
    assert cache.clear() == 1 and cache.info().empty and files_under(tmp_path) == []
    assert cache.clear() == 0


# ------------------------------------------------------------------------------------------ concurrency


def test_two_threads_compute_once(tmp_path):
    cache = DiskCache(tmp_path)
    compute = Counter({"w": torch.arange(4.0)}, delay=0.3)
    barrier = threading.Barrier(2)
    results, errors = [None, None], []

    def worker(i):
        try:
            barrier.wait()
            results[i] = cache.get_or_compute("act", {"layer": 3}, compute)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert compute.calls == 1
    assert all(torch.equal(r["w"], torch.arange(4.0)) for r in results)


CHILD = r"""
import json, os, sys, time
from pathlib import Path
from safesub_core.cache import DiskCache
root, go, log = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
def compute():
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.5)
    return {"value": 42}
deadline = time.time() + 20
while not go.exists() and time.time() < deadline:
    time.sleep(0.005)
print(json.dumps(DiskCache(root).get_or_compute("act", {"layer": 1}, compute)))
"""


def test_two_processes_compute_once(tmp_path):
    go, log = tmp_path / "go", tmp_path / "computed.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "c"), str(go), str(log)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    time.sleep(0.5)  # both children imported and waiting
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [json.loads(o) for o, _ in outs] == [{"value": 42}, {"value": 42}]
    assert len(log.read_text().split()) == 1  # computed once; the other waited, then read
