"""HTTP front end of a :class:`~runtime.service.ServingRuntime`, and ``tiermem serve``.

Endpoints
---------
``POST /predict``
    One request of B samples; answers ``{"predictions": [p_0, ..., p_{B-1}]}``.
    Bodies (``Content-Type``):

    ``application/json`` (default), per table::

        {"dense": [[0.1, ...13 floats], ...B rows],
         "sparse": {"emb_l.0": {"ids": [3, 1, 0], "lengths": [2, 1]},   # or "offsets": [0, 2, 3]
                    "emb_l.1": [[7], [2, 2]],                          # per-sample id lists
                    ...},
         "deadline_ms": 50}                                            # optional

    or KeyedJaggedTensor-like (``keys`` default to the model's tables, in order)::

        {"dense": [[...]], "keys": ["emb_l.0", ...], "values": [...],
         "lengths": [...T*B] | "offsets": [...T*B+1], "weights": [...] (optional)}

    ``application/x-npz``: an ``.npz`` archive (``np.savez``) with ``dense``
    ``(B, num_dense)``, optional ``keys`` (str array), ``values`` with
    ``offsets`` or ``lengths`` (KJT layout, key-major), optional ``weights``;
    or ``sparse`` ``(B, T)`` (one id per table and sample).

    ``application/x-tiermem``: the compact binary body of :mod:`runtime.wire`
    (arrays back to back, read as numpy views).

    The answer is JSON, or raw little-endian float32 when the request says
    ``Accept: application/octet-stream``.

    Every table of the model must be given. A deadline may also come as the
    ``X-Deadline-Ms`` header or the ``deadline_ms`` query parameter.

    Status codes: 200; 400 body not parseable (bad JSON / npz); 413 body over
    ``max_body_bytes``; 415 other content types; 422 well-formed but invalid
    (shapes, unknown or missing tables, ids out of range); 503 overloaded or
    shutting down (with ``Retry-After``); 504 deadline exceeded. Error bodies
    are ``{"error": "<message naming the problem>"}``.
``GET /healthz``
    200 while the process serves HTTP.
``GET /readyz``
    200 once warm-up finished, 503 before (and after shutdown began).
``GET /metrics``
    Prometheus text format, from a registry of the app's own.

CLI::

    tiermem serve --model demo-out/model.pt --store demo-out/store.zarr \\
        [--host 127.0.0.1] [--port 8000] [--tier dram|ssd|cxl] [--cache-size 10%|100000|64MiB] \\
        [--policy lru] [--prefetch-lookahead 2] [--max-batch-size 2048] [--max-delay-ms 2] \\
        [--max-queue 1024] [--max-queue-samples 65536] [--overload reject|wait] [--workers 1] \\
        [--default-deadline-ms MS] [--max-body-bytes 16MiB] [--no-warmup]

(also ``python -m runtime.server ...`` with the same options). It binds
127.0.0.1 unless told otherwise, prints ``listening on http://HOST:PORT``
(``--port 0`` picks a free port), and on SIGINT/SIGTERM stops accepting
connections, answers the accepted requests and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import io
import json
import logging
import math
import os
import signal
import struct
import sys
import threading
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import numpy as np

from runtime.batcher import (
    MAX_DEADLINE_S,
    BatcherClosed,
    DeadlineExceeded,
    Overloaded,
    RequestTooLarge,
)
from runtime.serve_cli import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_LIMIT_CONCURRENCY,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_JSON_BYTES,
    SERVE_COMMANDS,
    add_serve_commands,
)
from runtime.serve_cli import configure_serve as _configure_serve
from runtime.wire import (
    BINARY_TYPE,
    PREDICTIONS_TYPE,
    WireFormatError,
    decode_request,
    encode_predictions,
)
from tiermem.errors import ConfigError, InvalidBatchError, StoreError, TierMemError
from tiermem.features import SparseFeatures

if TYPE_CHECKING:
    from fastapi import FastAPI
    from prometheus_client.registry import Collector

    from runtime.service import ServingRuntime

__all__ = ["SERVE_COMMANDS", "add_serve_commands", "create_app", "main", "parse_json_body",
           "parse_npz_body"]

NPZ_TYPES = ("application/x-npz", "application/npz", "application/octet-stream")
NPZ_MAX_MEMBERS = 64
"""Most members an ``.npz`` body may have (a request needs at most six)."""
DECODE_OFF_LOOP_BYTES = 64 << 10
"""Bodies larger than this (and every npz: a small one may inflate 1000x) are decoded
on a decode thread, not on the event loop."""
BODY_TOTAL_TIMEOUT_S = 60.0
"""Longest a request body may take to arrive, however steadily it trickles."""
_ZIP_METHODS = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA", 9: "deflate64",
                98: "PPMd", 93: "zstd"}
_log = logging.getLogger("tiermem.server")


class HTTPError(Exception):
    """An HTTP error answer: status code and a message naming the problem."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# -- body parsing --------------------------------------------------------------------------

def _int_array(name: str, x: Any) -> np.ndarray:
    if not isinstance(x, list):
        raise HTTPError(422, f"{name} must be a list of integers, got {type(x).__name__}")
    if not x:
        return np.zeros(0, np.int64)
    try:
        a = np.asarray(x)
    except (ValueError, TypeError, OverflowError) as e:
        raise HTTPError(422, f"{name} must be a flat list of integers ({e})") from None
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise HTTPError(422, f"{name} must be a flat list of integers, got "
                        f"{'nested lists' if a.ndim != 1 else 'values of type ' + str(a.dtype)}")
    if a.dtype.kind == "u" and a.max() > np.iinfo(np.int64).max:
        raise HTTPError(422, f"{name} holds values beyond int64")
    return a.astype(np.int64, copy=False)


def _float_array(name: str, x: Any) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as e:
        raise HTTPError(422, f"{name} must hold numbers only ({e})") from None
    return a.astype(np.float32)


def _dense_array(x: Any, num_dense: int) -> np.ndarray:
    if not isinstance(x, list):
        raise HTTPError(422, f"'dense' must be a list of B lists of {num_dense} numbers, got "
                        f"{type(x).__name__}")
    if not x:
        return np.zeros((0, num_dense), np.float32)
    if any(not isinstance(r, list) for r in x):
        raise HTTPError(422, f"'dense' must be a list of B lists of {num_dense} numbers")
    bad = next((i for i, r in enumerate(x) if len(r) != num_dense), None)
    if bad is not None:
        raise HTTPError(422, f"'dense' row {bad} has {len(x[bad])} values; the model expects "
                        f"{num_dense}")
    a = _float_array("'dense'", x)
    if a.ndim != 2:
        raise HTTPError(422, f"'dense' must be a list of B lists of {num_dense} numbers")
    return a


def _table_from_json(name: str, spec: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    where = f"'sparse'[{name!r}]"
    if isinstance(spec, list):  # per-sample id lists
        if any(not isinstance(s, list) for s in spec):
            raise HTTPError(422, f"{where} must be a list of per-sample id lists, or an object "
                            "with 'ids' and 'lengths'/'offsets'")
        lengths = np.fromiter((len(s) for s in spec), np.int64, len(spec))
        ids = _int_array(f"{where} ids", [i for s in spec for i in s])
        off = np.zeros(len(spec) + 1, np.int64)
        np.cumsum(lengths, out=off[1:])
        return ids, off, None
    if not isinstance(spec, dict):
        raise HTTPError(422, f"{where} must be an object with 'ids' and 'lengths' (or "
                        f"'offsets'), got {type(spec).__name__}")
    unknown = set(spec) - {"ids", "lengths", "offsets", "weights"}
    if unknown:
        raise HTTPError(422, f"{where} has unknown field(s) {sorted(unknown)}")
    if "ids" not in spec:
        raise HTTPError(422, f"{where} lacks 'ids'")
    ids = _int_array(f"{where}['ids']", spec["ids"])
    if ("lengths" in spec) == ("offsets" in spec):
        raise HTTPError(422, f"{where} needs exactly one of 'lengths' and 'offsets'")
    if "lengths" in spec:
        lengths = _int_array(f"{where}['lengths']", spec["lengths"])
        if lengths.size and lengths.min() < 0:
            raise HTTPError(422, f"{where}['lengths'] has a negative length")
        off = np.zeros(lengths.size + 1, np.int64)
        np.cumsum(lengths, out=off[1:])
    else:
        off = _int_array(f"{where}['offsets']", spec["offsets"])
    w = None
    if spec.get("weights") is not None:
        w = _float_array(f"{where}['weights']", spec["weights"])
    return ids, off, w


def parse_json_body(raw: bytes, table_names: Sequence[str], num_dense: int
                    ) -> tuple[np.ndarray, SparseFeatures, float | None]:
    """``(dense, sparse, deadline_ms)`` from a JSON body (formats in the module docstring)."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise HTTPError(400, "body is JSON nested too deeply (a request needs 4 levels)"
                        ) from None
    if not isinstance(obj, dict):
        raise HTTPError(422, "body must be a JSON object with 'dense' and 'sparse' (or "
                        "'keys'/'values'/'lengths')")
    if "dense" not in obj:
        raise HTTPError(422, "body lacks 'dense' (a list of B lists of "
                        f"{num_dense} numbers)")
    dense = _dense_array(obj["dense"], num_dense)
    deadline = obj.get("deadline_ms")
    if deadline is not None and (isinstance(deadline, bool)
                                 or not isinstance(deadline, (int, float))):
        raise HTTPError(400, f"'deadline_ms' must be a number, got {str(deadline)[:40]!r}")
    try:
        if "sparse" in obj:
            sp = obj["sparse"]
            if not isinstance(sp, dict) or not sp:
                raise HTTPError(422, "'sparse' must be an object mapping table names to "
                                "{'ids': [...], 'lengths': [...]}")
            tables = []
            weights: dict[str, np.ndarray] = {}
            for name, spec in sp.items():
                ids, off, w = _table_from_json(name, spec)
                tables.append((name, ids, off))
                if w is not None:
                    weights[name] = w
            if weights and len(weights) != len(tables):
                for name, ids, _ in tables:  # unweighted tables weigh 1
                    weights.setdefault(name, np.ones(ids.size, np.float32))
            sparse = SparseFeatures.from_tables(tables, weights or None)
        elif "values" in obj:
            keys = obj.get("keys", list(table_names))
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise HTTPError(422, "'keys' must be a list of table names")
            values = _int_array("'values'", obj["values"])
            w = None if obj.get("weights") is None else _float_array("'weights'", obj["weights"])
            if ("lengths" in obj) == ("offsets" in obj):
                raise HTTPError(422, "give exactly one of 'lengths' and 'offsets' with 'values'")
            if "lengths" in obj:
                sparse = SparseFeatures.from_lengths(keys, values,
                                                     _int_array("'lengths'", obj["lengths"]), w)
            else:
                sparse = SparseFeatures.from_offsets(keys, values,
                                                     _int_array("'offsets'", obj["offsets"]), w)
        else:
            raise HTTPError(422, "body lacks sparse features: give 'sparse' (per table) or "
                            "'keys'/'values'/'lengths'")
    except InvalidBatchError as e:
        raise HTTPError(422, str(e)) from None
    return dense, sparse, deadline


def _read_npz(raw: bytes, max_unpacked_bytes: int) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz``: one pass over the zip, no pickles, bounded memory.

    Members must be stored or deflated; each is decompressed by streaming
    against a budget of ``max_unpacked_bytes`` in all (the sizes the zip
    directory declares are not trusted). Arrays are read-only views of the
    member bytes (about twice as fast as ``np.load``).
    """
    fmt = np.lib.format
    out: dict[str, np.ndarray] = {}
    budget = max_unpacked_bytes
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            infos = zf.infolist()
            if len(infos) > NPZ_MAX_MEMBERS:
                raise HTTPError(400, f"the .npz has {len(infos)} members; at most "
                                f"{NPZ_MAX_MEMBERS} are accepted")
            for info in infos:
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    how = _ZIP_METHODS.get(info.compress_type,
                                           f"compression method {info.compress_type}")
                    raise HTTPError(415, f".npz member {info.filename[:80]!r} is compressed "
                                    f"with {how}: only stored or deflated members "
                                    "(np.savez, np.savez_compressed) are accepted")
                data = _npz_member(raw, info, budget)
                if data is None:  # a compressed member must not balloon
                    raise HTTPError(413, f"the .npz unpacks to more than {max_unpacked_bytes} "
                                    "bytes, the limit")
                budget -= len(data)
                f = io.BytesIO(bytes(data[:10016]))  # magic + header: no copy of the data
                version = fmt.read_magic(f)
                read_header = (fmt.read_array_header_1_0 if version == (1, 0)
                               else fmt.read_array_header_2_0)
                shape, fortran, dtype = read_header(f, max_header_size=10000)
                if dtype.hasobject:
                    raise ValueError(f"member {info.filename!r} holds Python objects")
                count = math.prod(shape)
                if count * dtype.itemsize != len(data) - f.tell():
                    raise ValueError(f"member {info.filename[:80]!r} holds "
                                     f"{len(data) - f.tell()} bytes of data; its header "
                                     f"{dtype} {shape} says {count * dtype.itemsize}")
                arr = np.frombuffer(data, dtype, count=count, offset=f.tell())
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                out[name] = arr.reshape(shape, order="F" if fortran else "C")
    except HTTPError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any fault of untrusted bytes: zlib, zip, npy
        raise HTTPError(400, f"body is not a readable .npz archive: {type(e).__name__}: "
                        f"{str(e)[:200]}") from None
    return out


_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


def _npz_member(raw: bytes, info: zipfile.ZipInfo, budget: int) -> memoryview | bytes | None:
    """A member's bytes, or None when they are more than ``budget``.

    Inflated in steps of at most 16 KiB in and 1 MiB out, so no step holds the
    GIL long (``ZipFile.read`` trusts the declared size and, for bzip2/LZMA,
    inflates without a bound), stopping past ``budget``; then the CRC.
    """
    if info.flag_bits & 1:
        raise ValueError(f"member {info.filename[:80]!r} is encrypted")
    sig, *_, n_name, n_extra = _LOCAL_HEADER.unpack_from(raw, info.header_offset)
    if sig != b"PK\x03\x04":
        raise ValueError(f"member {info.filename[:80]!r}: no local header at its offset")
    start = info.header_offset + _LOCAL_HEADER.size + n_name + n_extra
    comp = memoryview(raw)[start:start + info.compress_size]
    if len(comp) != info.compress_size:
        raise ValueError(f"member {info.filename[:80]!r} runs past the end of the body")
    if info.compress_type == zipfile.ZIP_STORED:
        data: memoryview | bytes = comp
        if len(data) > budget:
            return None
    else:
        d = zlib.decompressobj(-zlib.MAX_WBITS)
        out, pos = bytearray(), 0
        while not d.eof:
            if d.unconsumed_tail:
                inp = d.unconsumed_tail
            elif pos < len(comp):
                inp, pos = comp[pos:pos + (16 << 10)], pos + (16 << 10)
            else:
                break
            out += d.decompress(inp, 1 << 20)
            if len(out) > budget:
                return None
        data = out
        if not d.eof:
            raise ValueError(f"member {info.filename[:80]!r}: the deflate stream is cut short")
    if zlib.crc32(data) != info.CRC:
        raise ValueError(f"member {info.filename[:80]!r}: CRC-32 mismatch")
    return data


def parse_npz_body(raw: bytes, table_names: Sequence[str], *, max_unpacked_bytes: int,
                   check_size: Callable[[int, int | None], None] | None = None
                   ) -> tuple[np.ndarray, SparseFeatures]:
    """``(dense, sparse)`` from an ``.npz`` body (formats in the module docstring).

    ``check_size(samples, ids)`` (e.g. the batcher's) runs on the counts before
    any array is widened or copied.
    """
    arrays = _read_npz(raw, max_unpacked_bytes)
    if "dense" not in arrays:
        raise HTTPError(422, f".npz lacks 'dense' (has {sorted(arrays)[:8]})")
    dense = arrays["dense"]
    if dense.dtype.kind not in "fiu" or dense.ndim != 2:
        raise HTTPError(422, f"'dense' must be a 2-D numeric array, got {dense.dtype} "
                        f"{dense.shape}")
    for name in ("sparse", "values", "offsets", "lengths"):
        a = arrays.get(name)
        if a is not None and (a.dtype.kind not in "iu" or a.ndim != (2 if name == "sparse"
                                                                     else 1)):
            raise HTTPError(422, f"'{name}' must be a {2 if name == 'sparse' else 1}-D integer "
                            f"array, got {a.dtype} {a.shape}")
    w = arrays.get("weights")
    if w is not None and (w.dtype.kind != "f" or w.ndim != 1):
        raise HTTPError(422, f"'weights' must be a 1-D float array, got {w.dtype} {w.shape}")
    if check_size is not None:  # before the ids are widened to int64
        ids_arr = arrays.get("sparse", arrays.get("values"))
        check_size(int(dense.shape[0]), None if ids_arr is None else int(ids_arr.size))
    keys = list(table_names)
    if "keys" in arrays:
        k = arrays["keys"]
        if k.dtype.kind not in "US" or k.ndim != 1:
            raise HTTPError(422, f"'keys' must be a 1-D array of table names, got {k.dtype}")
        if k.size > 4 * len(table_names) + 16:
            raise HTTPError(422, f"'keys' lists {k.size} names; the model has "
                            f"{len(table_names)} tables")
        keys = [str(x) for x in k.astype(str)]
    try:
        if "sparse" in arrays:
            ids = arrays["sparse"]
            if ids.ndim != 2 or ids.shape[1] != len(keys):
                raise HTTPError(422, f"'sparse' must have shape (B, {len(keys)}), got "
                                f"{ids.shape}")
            sparse = SparseFeatures.from_offsets(keys, np.ascontiguousarray(ids.T).reshape(-1),
                                                 np.arange(ids.size + 1, dtype=np.int64))
        elif "values" in arrays and ("offsets" in arrays or "lengths" in arrays):
            if "offsets" in arrays:
                sparse = SparseFeatures.from_offsets(keys, arrays["values"], arrays["offsets"], w)
            else:
                sparse = SparseFeatures.from_lengths(keys, arrays["values"], arrays["lengths"], w)
        else:
            raise HTTPError(422, "no sparse features: expected 'sparse', or 'values' with "
                            "'offsets'/'lengths'")
    except InvalidBatchError as e:
        raise HTTPError(422, str(e)) from None
    return dense, sparse


def npz_body(dense: np.ndarray, sparse: SparseFeatures) -> bytes:
    """The ``application/x-npz`` body of a request (the client side of :func:`parse_npz_body`)."""
    buf = io.BytesIO()
    arrays: dict[str, np.ndarray] = {"dense": np.asarray(dense, np.float32),
                                     "keys": np.array(sparse.keys), "values": sparse.values,
                                     "offsets": sparse.offsets}
    if sparse.weights is not None:
        arrays["weights"] = sparse.weights
    np.savez(buf, **arrays)
    return buf.getvalue()


def _deadline_param(raw: str | None, where: str) -> float | None:
    if raw is None:
        return None
    try:
        v = float(raw)
    except ValueError:
        raise HTTPError(400, f"{where} must be a number of milliseconds, got {raw[:40]!r}"
                        ) from None
    if not math.isfinite(v) or not 0 < v <= MAX_DEADLINE_S * 1e3:
        raise HTTPError(400, f"{where} must be a number of milliseconds > 0 and at most "
                        f"{MAX_DEADLINE_S * 1e3:.0f} (one hour), got {raw[:40]!r}")
    return v


# -- metrics ------------------------------------------------------------------------------

class _RuntimeCollector:
    """Prometheus families read from ``runtime.metrics()`` at scrape time."""

    def __init__(self, runtime: ServingRuntime) -> None:
        self.runtime = runtime

    def describe(self) -> list[Any]:
        return []  # no fixed set: collect() is called at scrape time only

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        m = self.runtime.metrics()
        c = CounterMetricFamily("tiermem_requests", "Requests by outcome (submitted = accepted "
                                "into the queue)", labels=["outcome"])
        for k, v in m["requests"].items():
            c.add_metric([k], v)
        yield c
        yield CounterMetricFamily("tiermem_batches", "Batches run", value=m["batches"])
        yield CounterMetricFamily("tiermem_samples", "Samples predicted", value=m["samples"])

        def hist(name: str, doc: str, h: dict[str, Any]) -> Any:
            cum, buckets = 0, []
            for b, n in zip([*h["bounds"], math.inf], h["counts"], strict=True):
                cum += n
                buckets.append(("+Inf" if b == math.inf else repr(float(b)), cum))
            return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h["sum"])

        yield hist("tiermem_request_latency_seconds",
                   "Latency of completed requests, submit to answer", m["latency_seconds"])
        yield hist("tiermem_batch_size_samples", "Samples per batch", m["batch_size"])
        yield hist("tiermem_batch_requests", "Requests merged per batch", m["batch_requests"])
        yield hist("tiermem_batch_seconds", "Time of one batch's predict", m["batch_seconds"])
        yield GaugeMetricFamily("tiermem_queue_requests", "Requests waiting",
                                value=m["queue"]["requests"])
        yield GaugeMetricFamily("tiermem_queue_samples", "Samples waiting",
                                value=m["queue"]["samples"])
        yield GaugeMetricFamily("tiermem_ready", "1 once warm-up finished and not degraded",
                                value=1.0 if m["ready"] else 0.0)
        f = CounterMetricFamily("tiermem_faults", "Server-side faults by kind (store, shard, "
                                "internal, nonfinite predictions)", labels=["kind"])
        for k, v in m["faults"].items():
            f.add_metric([k], v)
        yield f
        t = m["tier"]
        kind = [t["kind"]]
        for key, doc in (("bytes_read", "Bytes read from the tier"),
                         ("rows_read", "Rows read from the tier"),
                         ("lookups", "Ids pooled"), ("read_ops", "Read operations")):
            f = CounterMetricFamily(f"tiermem_tier_{key}", doc, labels=["tier"])
            f.add_metric(kind, t[key])
            yield f
        cache = t["cache"]
        if cache is not None:
            g = GaugeMetricFamily("tiermem_cache_hit_ratio", "Share of distinct rows per batch "
                                  "found in the DRAM cache", labels=["table"])
            g.add_metric(["all"], cache["hit_rate"])
            for name, v in cache["hit_rate_per_table"].items():
                g.add_metric([name], v)
            yield g
            yield GaugeMetricFamily("tiermem_cache_lookup_hit_ratio",
                                    "Share of lookups served by the cache",
                                    value=cache["lookup_hit_rate"])
            b = GaugeMetricFamily("tiermem_tier_bytes", "DRAM held per tier", labels=["tier"])
            b.add_metric(["dram_cache"], cache["nbytes"])
            yield b
            yield GaugeMetricFamily("tiermem_cache_resident_rows", "Rows in the cache",
                                    value=cache["resident_rows"])
            yield CounterMetricFamily("tiermem_cache_hits", "Distinct rows found in the cache",
                                      value=cache["hits"])
            yield CounterMetricFamily("tiermem_cache_misses", "Distinct rows read from the tier",
                                      value=cache["misses"])
            p = CounterMetricFamily("tiermem_prefetch_rows", "Prefetcher rows by fate",
                                    labels=["fate"])
            for k, v in cache["prefetch"].items():
                p.add_metric([k], v)
            yield p


# -- the app ------------------------------------------------------------------------------

_PREDICTIONS_B = PREDICTIONS_TYPE.encode()


def _app_class() -> type:
    from fastapi import FastAPI

    class App(FastAPI):
        """FastAPI for every endpoint but ``/predict``, which a bare ASGI handler serves."""

        def __init__(self, predict: Callable[..., Any], **kw: Any) -> None:
            super().__init__(**kw)
            self._predict = predict

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"] == "/predict":
                await self._predict(scope, receive, send)
            else:
                await super().__call__(scope, receive, send)

    return App


def _shard_errors() -> tuple[type[BaseException], ...]:
    """The sharded session's fault types, if it can be imported (Ray may be absent)."""
    try:
        from runtime.distributed.sharded import ShardError
    except Exception:  # noqa: BLE001 - no Ray, no shards
        return ()
    return (ShardError,)


def create_app(runtime: ServingRuntime, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               retry_after_s: int = 1, max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
               auth_token: str | None = None) -> FastAPI:
    """A FastAPI app serving ``runtime`` (endpoints in the module docstring).

    ``max_json_bytes`` bounds JSON bodies (parsing holds the GIL: larger ones
    would stall every other request); ``body_timeout_s`` is the longest pause
    while a body arrives (then 408); ``auth_token`` makes ``/predict`` and
    ``/metrics`` require ``Authorization: Bearer <token>``. The app does not own
    the runtime: close it after the server stopped.
    """
    from fastapi import Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
    from prometheus_client import Histogram as PromHistogram

    from runtime.service import LATENCY_BUCKETS_S

    for name, v in (("max_body_bytes", max_body_bytes), ("max_json_bytes", max_json_bytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
    if isinstance(body_timeout_s, bool) or not isinstance(body_timeout_s, (int, float)) \
            or not 0 < body_timeout_s < 1e6:
        raise ConfigError(f"body_timeout_s must be a number > 0, got {body_timeout_s!r}")
    if auth_token is not None and not auth_token:
        raise ConfigError("auth_token must not be empty")
    expected_auth = None if auth_token is None else f"Bearer {auth_token}".encode()
    registry = CollectorRegistry(auto_describe=False)
    collector: Collector = _RuntimeCollector(runtime)  # type: ignore[assignment]
    registry.register(collector)
    http_requests = Counter("tiermem_http_requests", "HTTP requests by endpoint and status",
                            ["endpoint", "code"], registry=registry)
    http_latency = PromHistogram("tiermem_http_request_duration_seconds",
                                 "HTTP request time, body read to answer written",
                                 ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=registry)
    batcher = runtime.batcher
    table_names = tuple(batcher.table_names)
    num_dense = batcher.num_dense
    check_size = batcher.check_size
    reject_mode = runtime.config.overload == "reject"
    shard_errors = _shard_errors()
    decode_pool = ThreadPoolExecutor(2, thread_name_prefix="tiermem-decode")
    retry = {"Retry-After": str(retry_after_s)}

    def error_body(message: str, request_id: str | None = None) -> bytes:
        d = {"error": message}
        if request_id is not None:
            d["request_id"] = request_id
        return json.dumps(d).encode()

    def authorized(headers: dict[bytes, bytes]) -> bool:
        return expected_auth is None or hmac.compare_digest(
            headers.get(b"authorization", b""), expected_auth)

    async def read_body(receive: Callable[[], Any], declared: bytes | None) -> bytes:
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise HTTPError(400, f"bad Content-Length {declared[:40]!r}") from None
            if n > max_body_bytes:
                raise HTTPError(413, f"body of {n} bytes is over the limit of {max_body_bytes} "
                                "bytes; split the request")
        chunks, n = [], 0
        t_end = time.monotonic() + BODY_TOTAL_TIMEOUT_S
        while True:
            wait = min(body_timeout_s, t_end - time.monotonic())
            try:
                msg = await asyncio.wait_for(receive(), max(wait, 0.0))
            except TimeoutError:
                raise HTTPError(408, f"the request body stopped arriving ({n} bytes received, "
                                f"none for {wait:.3g} s)", {"Connection": "close"}) from None
            if msg["type"] == "http.disconnect":
                raise asyncio.CancelledError("the client went away")
            chunk = msg.get("body", b"")
            n += len(chunk)
            if n > max_body_bytes:
                raise HTTPError(413, f"body is over the limit of {max_body_bytes} bytes; split "
                                "the request")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def decode(body: bytes, ctype_s: str) -> tuple[np.ndarray, SparseFeatures, float | None]:
        """Parse one body (on the loop for small ones, on a decode thread for large)."""
        try:
            return decode_any(body, ctype_s)
        except RequestTooLarge as e:
            raise HTTPError(413, str(e)) from None

    def decode_any(body: bytes, ctype_s: str
                   ) -> tuple[np.ndarray, SparseFeatures, float | None]:
        if ctype_s == BINARY_TYPE:
            try:
                return (*decode_request(body, table_names, num_dense, check_size=check_size),
                        None)
            except WireFormatError as e:
                raise HTTPError(e.status, str(e)) from None
        if ctype_s in NPZ_TYPES:
            return (*parse_npz_body(body, table_names, max_unpacked_bytes=4 * max_body_bytes,
                                    check_size=check_size), None)
        if len(body) > max_json_bytes:
            raise HTTPError(413, f"JSON body of {len(body)} bytes is over the JSON limit of "
                            f"{max_json_bytes} bytes: send large requests as {BINARY_TYPE} or "
                            "application/x-npz")
        return parse_json_body(body, table_names, num_dense)

    async def handle_predict(headers: dict[bytes, bytes], query: bytes,
                             receive: Callable[[], Any]) -> tuple[int, bytes, bytes]:
        if not authorized(headers):
            raise HTTPError(401, "missing or wrong 'Authorization: Bearer <token>' header",
                            {"WWW-Authenticate": "Bearer"})
        ctype = headers.get(b"content-type", b"application/json").split(b";")[0].strip()
        ctype_s = ctype.decode("latin-1").lower()
        if ctype_s not in (BINARY_TYPE, *NPZ_TYPES, "application/json", "text/json", ""):
            raise HTTPError(415, f"unsupported Content-Type {ctype_s[:60]!r}: use "
                            f"application/json, {BINARY_TYPE} or application/x-npz")
        raw = headers.get(b"x-deadline-ms")
        deadline = _deadline_param(None if raw is None else raw.decode("latin-1"),
                                   "X-Deadline-Ms header")
        if deadline is None and query:
            q = parse_qs(query.decode("latin-1")).get("deadline_ms")
            deadline = _deadline_param(q[-1] if q else None, "deadline_ms parameter")
        body = await read_body(receive, headers.get(b"content-length"))
        t_body = time.monotonic()
        if reject_mode and batcher.queue_full():  # decided before any decoding work
            raise HTTPError(503, "overloaded: the request queue is full", retry)
        if len(body) > DECODE_OFF_LOOP_BYTES or ctype_s in NPZ_TYPES:  # npz: may inflate
            loop = asyncio.get_running_loop()
            dense, sparse, jd = await loop.run_in_executor(decode_pool, decode, body, ctype_s)
        else:
            dense, sparse, jd = decode(body, ctype_s)
        if deadline is None and jd is not None:
            deadline = _deadline_param(str(jd), "'deadline_ms'")
        try:
            preds = await runtime.predict_async(dense, sparse, deadline_ms=deadline,
                                                t_start=t_body)
        except RequestTooLarge as e:
            raise HTTPError(413, str(e)) from None
        except InvalidBatchError as e:
            raise HTTPError(422, str(e)) from None
        except ConfigError as e:  # the deadline
            raise HTTPError(400, str(e)) from None
        except Overloaded as e:
            raise HTTPError(503, f"overloaded: {e}", retry) from None
        except BatcherClosed as e:
            raise HTTPError(503, f"shutting down: {e}", retry) from None
        except DeadlineExceeded as e:
            raise HTTPError(504, f"deadline exceeded: {e}") from None
        except shard_errors as e:
            raise _Fault("shard", 503, "a shard is unavailable", e, retry) from None
        except StoreError as e:
            raise _Fault("store", 503, "storage fault", e, retry) from None
        except Exception as e:  # noqa: BLE001 - anything else while predicting: ours
            raise _Fault("internal", 500, "internal error", e) from None
        if not np.isfinite(preds).all():
            bad = int(np.count_nonzero(~np.isfinite(preds)))
            raise _Fault("nonfinite", 500, f"{bad} of {preds.size} predictions are NaN or "
                         "infinite (a corrupted embedding row or model)", None)
        if _PREDICTIONS_B in headers.get(b"accept", b""):
            return 200, encode_predictions(preds), _PREDICTIONS_B
        return 200, json.dumps({"predictions": preds.tolist()}).encode(), b"application/json"

    ok_requests = http_requests.labels("/predict", "200")
    predict_latency = http_latency.labels("/predict")

    async def predict(scope: dict[str, Any], receive: Callable[[], Any],
                      send: Callable[[Any], Any]) -> None:
        """``POST /predict`` as a bare ASGI handler: the hot path of a server under load.

        Starlette's request/response layers cost ~0.3 ms of event-loop time per
        request, all under the GIL the batch workers also need.
        """
        t0 = time.perf_counter()
        extra: list[tuple[bytes, bytes]] = []
        ctype = b"application/json"
        if scope["method"] != "POST":
            status, body = 405, error_body("use POST for /predict")
            extra.append((b"allow", b"POST"))
        else:
            try:
                status, body, ctype = await handle_predict(dict(scope["headers"]),
                                                           scope.get("query_string", b""),
                                                           receive)
            except HTTPError as e:
                status, body = e.status, error_body(e.message)
                extra.extend((k.lower().encode(), v.encode()) for k, v in e.headers.items())
            except (TierMemError, ValueError) as e:  # input problems the parsers did not name
                status, body = 422, error_body(str(e)[:500])
            except asyncio.CancelledError:
                http_requests.labels("/predict", "499").inc()
                raise
            except Exception as e:  # noqa: BLE001 - answer 5xx, keep serving
                fault = e if isinstance(e, _Fault) else _Fault("internal", 500,
                                                                "internal error", e)
                rid = uuid.uuid4().hex[:16]
                what = fault.cause if fault.cause is not None else fault
                _log.error("request %s: %s: %s", rid, fault.message,
                           "" if fault.cause is None else repr(fault.cause),
                           exc_info=what if fault.cause is not None else None)
                runtime.record_fault(fault.kind, f"{fault.message} (request {rid})")
                status = fault.status
                body = error_body(f"{fault.message} (request id {rid}; details in the server "
                                  "log)", rid)
                extra.extend((k.lower().encode(), v.encode()) for k, v in fault.headers.items())
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype),
                                (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})
        (ok_requests if status == 200 else http_requests.labels("/predict", str(status))).inc()
        predict_latency.observe(time.perf_counter() - t0)

    app = _app_class()(predict, title="tiermem", summary="DLRM inference with tiered embeddings",
               docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = runtime
    app.state.registry = registry
    app.state.decode_pool = decode_pool

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if runtime.ready:
            return JSONResponse({"ready": True})
        degraded = runtime.degraded_reason
        why = ("warm-up failed: " + repr(runtime.warmup_error) if runtime.warmup_error
               else "shutting down" if runtime.closed
               else "degraded: " + degraded if degraded is not None else "warming up")
        return JSONResponse({"ready": False, "reason": why}, status_code=503,
                            headers={"Retry-After": str(retry_after_s)})

    async def metrics(request: Request) -> Response:
        if not authorized({b"authorization": request.headers.get("authorization", "")
                           .encode("latin-1")}):
            return JSONResponse({"error": "missing or wrong 'Authorization: Bearer <token>' "
                                 "header"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_route("/healthz", healthz, methods=["GET"])
    app.add_route("/readyz", readyz, methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"])
    return app


class _Fault(Exception):
    """A server-side fault: counted, logged with a request id, answered 5xx without
    the exception's text."""

    def __init__(self, kind: str, status: int, message: str, cause: BaseException | None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.kind, self.status, self.message, self.cause = kind, status, message, cause
        self.headers = headers or {}


def _protocol_class(header_timeout_s: float) -> type:
    """uvicorn's HTTP protocol, closing connections whose request headers do not arrive
    within ``header_timeout_s`` (uvicorn itself waits forever for them)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class Protocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._tm_arm()

        def _tm_arm(self) -> None:
            self._tm_timer = self.loop.call_later(header_timeout_s, self._tm_timeout)

        def _tm_timeout(self) -> None:
            cycle = self.cycle
            if cycle is None or cycle.response_complete:  # no request being served: headers
                if not self.transport.is_closing():        # stalled (or an idle keep-alive)
                    self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._tm_timer.cancel()
            self._tm_arm()

        def connection_lost(self, exc: Exception | None) -> None:
            timer = getattr(self, "_tm_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

    return Protocol


def server_config(app: Any, *, limit_concurrency: int | None = DEFAULT_LIMIT_CONCURRENCY,
                  timeout_keep_alive: float = 5.0,
                  header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                  log_level: str = "warning", **kw: Any) -> Any:
    """The ``uvicorn.Config`` ``tiermem serve`` runs ``app`` with: a connection cap
    (``limit_concurrency``: beyond it, 503), keep-alive and header timeouts, a bound
    on an incomplete request's buffered bytes. ``kw`` go to ``uvicorn.Config``
    (e.g. ``ssl_certfile``, ``ssl_keyfile``)."""
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                          timeout_graceful_shutdown=30, limit_concurrency=limit_concurrency,
                          timeout_keep_alive=timeout_keep_alive,
                          h11_max_incomplete_event_size=64 << 10,
                          http=_protocol_class(header_timeout_s), **kw)


# -- CLI ----------------------------------------------------------------------------------

# the options are in runtime/serve_cli.py (a light module: tiermem --help needs no numpy)


def build_runtime(args: argparse.Namespace) -> ServingRuntime:
    """The session and serving runtime the ``serve`` options describe."""
    from runtime.cli import _tier_config
    from runtime.distributed.plan_cli import open_session
    from runtime.service import ServingConfig, ServingRuntime
    from runtime.session import RuntimeConfig

    cache = prefetch = None
    if args.cache_size is not None:
        from tiermem.cache.cache import CacheConfig

        cache = CacheConfig(policy=args.policy, **args.cache_size)
    if args.prefetch_lookahead:
        from tiermem.cache.prefetch import PrefetchConfig

        prefetch = PrefetchConfig(lookahead=args.prefetch_lookahead)
    threads = args.threads
    if threads == "auto" and args.workers > 1:  # the meter would give each worker every core
        threads = max(1, (os.cpu_count() or 1) // args.workers)
    cfg = RuntimeConfig(tier=_tier_config(args), num_threads=threads, cache=cache,
                        prefetch=prefetch)
    scfg = ServingConfig(max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms,
                         max_queue_requests=args.max_queue,
                         max_queue_samples=args.max_queue_samples, overload=args.overload,
                         max_request_samples=args.max_request_samples,
                         max_request_ids=args.max_request_ids,
                         wait_timeout_s=args.wait_timeout_s,
                         max_queue_delay_ms=args.max_queue_delay_ms,
                         default_deadline_ms=args.default_deadline_ms,
                         warmup=not args.no_warmup,
                         prefetch_batches=max(args.prefetch_lookahead, 1),
                         workers=args.workers)
    session = open_session(args, cfg)
    try:
        return ServingRuntime(session, scfg, owns_session=True)
    except BaseException:
        session.close()
        raise


class _Stop(Exception):
    """SIGTERM arrived (after uvicorn's graceful shutdown)."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop


def _bind(host: str, port: int) -> Any:
    """The listening socket, bound before the model loads: a taken port fails in a moment."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        hint = (" (another process listens there: pick another --port, or --port 0 for a "
                "free one)" if isinstance(e, OSError) and e.errno == errno.EADDRINUSE else "")
        raise ConfigError(f"cannot bind {host}:{port}: {why}{hint}") from None
    return sock


def serve(args: argparse.Namespace) -> int:
    """``tiermem serve``: bind, load, warm up, serve until SIGINT/SIGTERM, drain."""
    import uvicorn

    sock = _bind(args.host, args.port)
    try:
        runtime = build_runtime(args)
    except BaseException:
        sock.close()
        raise
    try:
        token = args.auth_token or os.environ.get("TIERMEM_AUTH_TOKEN") or None
        app = create_app(runtime, max_body_bytes=args.max_body_bytes,
                         max_json_bytes=args.max_json_bytes, body_timeout_s=args.body_timeout_s,
                         auth_token=token)
        host, port = sock.getsockname()[:2]
        tls = {k: v for k, v in (("ssl_certfile", args.ssl_certfile),
                                 ("ssl_keyfile", args.ssl_keyfile)) if v}
        config = server_config(app, limit_concurrency=args.limit_concurrency,
                               timeout_keep_alive=args.timeout_keep_alive,
                               header_timeout_s=args.header_timeout_s,
                               log_level=args.log_level, **tls)
        server = uvicorn.Server(config)
        sock.listen(config.backlog)  # now: a client that read the line below can connect
        scheme = "https" if tls else "http"
        print(f"tiermem serve: listening on {scheme}://{host}:{port} "
              f"({len(runtime.batcher.table_names)} tables, tier {args.tier})", flush=True)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal
        # with the handler found at start: make both land here, not kill the process
        # before the queue is drained.
        main_thread = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, _raise_stop) if main_thread else None
        try:
            server.run(sockets=[sock])
        except (KeyboardInterrupt, _Stop):
            pass
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, old)
    finally:
        runtime.close(drain=True)
    print("tiermem serve: stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m runtime.server`` = ``tiermem serve``."""
    ap = argparse.ArgumentParser(prog="python -m runtime.server",
                                 description="Serve a DLRM checkpoint + store over HTTP.")
    _configure_serve(ap)
    args = ap.parse_args(argv)
    try:
        return SERVE_COMMANDS["serve"](args)
    except TierMemError as e:
        print(f"tiermem serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
