"""How cache keys and values are written down: canonical key parts and the three value kinds, without pickle.

Contract:
- Key parts (`canonical`) may hold str, int, float, bool, None, lists, tuples (written as lists) and dicts with str
  keys; anything else (numpy scalars, paths, objects) raises `TypeError`, so two spellings of one value never
  silently share or split a key. ``1`` and ``1.0`` and ``True`` stay different.
- Values (`kind_of`) are one of three kinds:
  ``"tensors"``    a non-empty ``dict[str, torch.Tensor]``, as a safetensors file (tensors detached, moved to CPU,
                   contiguous; `as_tensors`);
  ``"dataframe"``  a ``pandas.DataFrame``, as JSON that round-trips dtypes exactly (numpy bool/int/uint/float,
                   ``str``/``string``, nullable ``Int*``/``Float*``/``boolean``, ``object`` columns of
                   str/int/float/bool/None; range, plain or multi indexes; floats via their shortest exact repr;
                   `encode_frame` / `decode_frame`);
  ``"json"``       any other dict or a list, as JSON (NaN allowed; `encode_json`).
  Other values or column dtypes (category, datetime, ...) raise `TypeError` before anything is written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

EXTENSIONS = {"tensors": ".safetensors", "dataframe": ".frame.json", "json": ".value.json"}
_MASKED = {"Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Float32", "Float64", "boolean"}


# ---------------------------------------------------------------------------------------------------- keys


def canonical(x: Any, where: str) -> Any:
    """Key parts `x` as plain JSON values (tuples as lists); TypeError naming `where` for anything else."""
    if x is None or type(x) in (str, bool, int, float):
        return x
    if isinstance(x, (list, tuple)):
        return [canonical(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise TypeError(f"cache key part {where}: dict key {k!r} is not a str")
            out[k] = canonical(v, f"{where}.{k}")
        return out
    raise TypeError(
        f"cache key part {where}: {type(x).__name__} is not str, int, float, bool, None, list, tuple or dict"
    )


# ---------------------------------------------------------------------------------------------------- values


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON (NaN allowed)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=True, separators=(",", ":")).encode("utf-8")


def kind_of(value: Any) -> str:
    """'tensors', 'dataframe' or 'json' (see the module docstring); TypeError for anything else."""
    if isinstance(value, pd.DataFrame):
        return "dataframe"
    if isinstance(value, dict) and value:
        n = sum(isinstance(v, torch.Tensor) for v in value.values())
        if n == len(value):
            return "tensors"
        if n:
            raise TypeError("cache value: a dict mixing tensors and other values cannot be cached")
    if isinstance(value, (dict, list)):
        return "json"
    raise TypeError(
        f"cache value: {type(value).__name__} is not a dict of tensors, a pandas DataFrame, or a JSON dict/list"
    )


def as_tensors(value: dict) -> dict:
    """The tensors as stored: detached, on the CPU, contiguous, none sharing memory with another."""
    out, seen = {}, set()
    for k, t in value.items():
        if not isinstance(k, str):
            raise TypeError(f"tensor dict key {k!r} is not a str")
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # safetensors refuses tensors sharing memory
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def encode_json(value: Any) -> bytes:
    """A JSON value (numpy scalars as Python numbers); TypeError for what JSON cannot hold."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=True, default=_json_default).encode("utf-8")
    except ValueError as err:  # circular references
        raise TypeError(f"cache value: {err}") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cache value: {type(o).__name__} is not JSON-serialisable")


def decode(kind: str, path: Path) -> Any:
    """The value of `kind` stored at `path`."""
    if kind == "tensors":
        return load_file(str(path))
    data = path.read_bytes()
    if kind == "dataframe":
        return decode_frame(data)
    if kind == "json":
        return json.loads(data)
    raise ValueError(f"unknown cache value type {kind!r}")


# ---------------------------------------------------------------------------------------------------- frames


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, bool, int, float))


def _encode_values(values, dtype, what: str) -> dict:
    name = str(dtype)
    if isinstance(dtype, np.dtype) and dtype.kind in "biuf":
        return {"dtype": name, "values": values.tolist()}
    if isinstance(dtype, np.dtype) and dtype.kind == "O":
        out = []
        for v in values.tolist():
            v = v.item() if isinstance(v, np.generic) else v
            if not _is_scalar(v):
                raise TypeError(f"DataFrame {what}: object value {v!r} is not str, int, float, bool or None")
            out.append(v)
        return {"dtype": "object", "values": out}
    if name in ("str", "string") or name in _MASKED:
        out = [None if v is pd.NA or (name in ("str", "string") and not isinstance(v, str)) else v
               for v in values.tolist()]
        return {"dtype": name, "values": out}
    raise TypeError(
        f"DataFrame {what}: dtype {name} cannot be cached (use bool, int, float, str, nullable or object-of-scalars)"
    )


def _decode_values(enc: dict):
    dtype = pd.api.types.pandas_dtype(enc["dtype"])
    values = enc["values"]
    if isinstance(dtype, np.dtype):
        if dtype.kind == "O":
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            return arr, dtype
        return np.array(values, dtype=dtype), dtype
    return pd.array(values, dtype=dtype), dtype


def _check_label(v: Any, what: str) -> Any:
    v = v.item() if isinstance(v, np.generic) else v
    if not _is_scalar(v):
        raise TypeError(f"DataFrame {what}: name {v!r} is not str, int, float, bool or None")
    return v


def _encode_index(idx, what: str) -> dict:
    if isinstance(idx, pd.MultiIndex):
        levels = [_encode_values(idx.get_level_values(i), idx.levels[i].dtype, what) for i in range(idx.nlevels)]
        return {"kind": "multi", "names": [_check_label(n, what) for n in idx.names], "levels": levels}
    if isinstance(idx, pd.RangeIndex):
        return {"kind": "range", "name": _check_label(idx.name, what),
                "start": idx.start, "stop": idx.stop, "step": idx.step}
    return {"kind": "index", "name": _check_label(idx.name, what), **_encode_values(idx, idx.dtype, what)}


def _decode_index(enc: dict):
    if enc["kind"] == "range":
        return pd.RangeIndex(enc["start"], enc["stop"], enc["step"], name=enc["name"])
    if enc["kind"] == "multi":
        arrays = [pd.Index(arr, dtype=dtype) for arr, dtype in map(_decode_values, enc["levels"])]
        return pd.MultiIndex.from_arrays(arrays, names=enc["names"])
    arr, dtype = _decode_values(enc)
    return pd.Index(arr, dtype=dtype, name=enc["name"])


def encode_frame(df: pd.DataFrame) -> bytes:
    """The frame as JSON that `decode_frame` reads back with the same dtypes, index and columns."""
    doc = {
        "format": "safesub-frame/1",
        "columns": _encode_index(df.columns, "columns"),
        "index": _encode_index(df.index, "index"),
        "data": [_encode_values(df.iloc[:, i], df.dtypes.iloc[i], f"column {df.columns[i]!r}")
                 for i in range(df.shape[1])],
    }
    return json_bytes(doc)


def decode_frame(data: bytes) -> pd.DataFrame:
    doc = json.loads(data)
    index = _decode_index(doc["index"])
    columns = _decode_index(doc["columns"])
    series = {}
    for i, enc in enumerate(doc["data"]):
        arr, dtype = _decode_values(enc)
        series[i] = pd.Series(arr, dtype=dtype, index=index, copy=False)
    df = pd.DataFrame(series, index=index)
    df.columns = columns
    return df
