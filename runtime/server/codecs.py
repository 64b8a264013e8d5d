"""Bodies of ``POST /predict``: one codec per Content-Type, looked up in a registry.

Request bodies (``Content-Type``; parameters such as ``; charset`` are ignored):

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

The answer is JSON (``{"predictions": [...]}``), or raw little-endian float32
when the request's ``Accept`` names ``application/octet-stream``.

A new body format is a decode (or encode) function and one
:func:`register_request_codec` (:func:`register_response_codec`) call: the
app, its 415 answer and its choice of decoding thread follow the registry.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.server.errors import HTTPError
from runtime.wire import (
    BINARY_TYPE,
    PREDICTIONS_TYPE,
    WireFormatError,
    decode_request,
    encode_predictions,
)
from tiermem.errors import InvalidBatchError
from tiermem.features import SparseFeatures

__all__ = ["NPZ_TYPES", "DecodeLimits", "RequestCodec", "encode_response", "parse_json_body",
           "parse_npz_body", "register_request_codec", "register_response_codec",
           "request_codec"]

NPZ_TYPES = ("application/x-npz", "application/npz", "application/octet-stream")
NPZ_MAX_MEMBERS = 64
"""Most members an ``.npz`` body may have (a request needs at most six)."""
_ZIP_METHODS = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA", 9: "deflate64",
                98: "PPMd", 93: "zstd"}

Decoded = tuple[np.ndarray, SparseFeatures, float | None]
"""``(dense, sparse, deadline_ms)``: what a request codec makes of a body (the deadline
only where the format carries one)."""


# -- the registry -------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeLimits:
    """What a request body is decoded against: the model's inputs and the server's limits."""

    table_names: tuple[str, ...]
    num_dense: int
    check_size: Callable[[int, int | None], None] | None
    """``check_size(samples, ids)`` (the batcher's), run on the declared counts before
    any array is allocated or widened."""
    max_body_bytes: int
    max_json_bytes: int


@dataclass(frozen=True)
class RequestCodec:
    """One request body format."""

    content_type: str
    """The media type the 415 answer suggests."""
    decode: Callable[[bytes, DecodeLimits], Decoded]
    aliases: tuple[str, ...] = ()
    """Other media types decoded the same way."""
    off_loop: bool = False
    """Decode every body on a decode thread, however small (a small npz may inflate
    1000x); otherwise only bodies past the app's size threshold are."""


_REQUEST_CODECS: dict[str, RequestCodec] = {}
_RESPONSE_CODECS: dict[bytes, Callable[[np.ndarray], bytes]] = {}


def register_request_codec(codec: RequestCodec) -> None:
    """Decode bodies of ``codec``'s media types with it."""
    types = (codec.content_type, *codec.aliases)
    taken = [t for t in types if t in _REQUEST_CODECS]
    if taken:
        raise ValueError(f"Content-Type(s) {taken} already have a request codec")
    _REQUEST_CODECS.update(dict.fromkeys(types, codec))


def register_response_codec(content_type: str, encode: Callable[[np.ndarray], bytes]) -> None:
    """Answer with ``encode(predictions)`` when a request's ``Accept`` names
    ``content_type`` (JSON otherwise)."""
    key = content_type.encode("latin-1")
    if key in _RESPONSE_CODECS:
        raise ValueError(f"Content-Type {content_type!r} already has a response codec")
    _RESPONSE_CODECS[key] = encode


def request_codec(content_type: str) -> RequestCodec:
    """The codec of a lower-cased media type without parameters; 415 when none."""
    codec = _REQUEST_CODECS.get(content_type)
    if codec is None:
        names = list(dict.fromkeys(c.content_type for c in _REQUEST_CODECS.values()))
        raise HTTPError(415, f"unsupported Content-Type {content_type[:60]!r}: use "
                        f"{', '.join(names[:-1])} or {names[-1]}")
    return codec


def encode_response(predictions: np.ndarray, accept: bytes) -> tuple[bytes, bytes]:
    """``(body, content type)`` of the answer to a request whose ``Accept`` header is
    ``accept``."""
    for content_type, encode in _RESPONSE_CODECS.items():
        if content_type in accept:
            return encode(predictions), content_type
    return json.dumps({"predictions": predictions.tolist()}).encode(), b"application/json"


# -- JSON ---------------------------------------------------------------------------------

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


# -- npz ----------------------------------------------------------------------------------

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


def _npz_member(raw: bytes, info: zipfile.ZipInfo, budget: int
                ) -> memoryview | bytes | bytearray | None:
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
        data: memoryview | bytes | bytearray = comp
        if len(data) > budget:
            return None
    else:
        d = zlib.decompressobj(-zlib.MAX_WBITS)
        out, pos = bytearray(), 0
        inp: bytes | memoryview
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



# -- the codecs ---------------------------------------------------------------------------

def _decode_json(body: bytes, limits: DecodeLimits) -> Decoded:
    if len(body) > limits.max_json_bytes:
        raise HTTPError(413, f"JSON body of {len(body)} bytes is over the JSON limit of "
                        f"{limits.max_json_bytes} bytes: send large requests as {BINARY_TYPE} "
                        "or application/x-npz")
    return parse_json_body(body, limits.table_names, limits.num_dense)


def _decode_binary(body: bytes, limits: DecodeLimits) -> Decoded:
    try:
        return (*decode_request(body, limits.table_names, limits.num_dense,
                                check_size=limits.check_size), None)
    except WireFormatError as e:
        raise HTTPError(e.status, str(e)) from None


def _decode_npz(body: bytes, limits: DecodeLimits) -> Decoded:
    return (*parse_npz_body(body, limits.table_names, max_unpacked_bytes=4 * limits.max_body_bytes,
                            check_size=limits.check_size), None)


register_request_codec(RequestCodec("application/json", _decode_json, aliases=("text/json", "")))
register_request_codec(RequestCodec(BINARY_TYPE, _decode_binary))
register_request_codec(RequestCodec(NPZ_TYPES[0], _decode_npz, aliases=NPZ_TYPES[1:],
                                    off_loop=True))
register_response_codec(PREDICTIONS_TYPE, encode_predictions)
