"""Update compression: what a site packs its update into before upload, and how it is unpacked.

The wire carries float32 tensors only (:class:`~fedcare.params.Parameters`),
so a compressed update travels as raw bytes viewed as one float32 tensor
named :data:`COMPRESSED_TENSOR` (zero-padded to a multiple of 4 bytes), the
trick secure aggregation uses for its ``uint32`` words. Every layout is set
by the method and the model's spec, so the coordinator knows the largest
length (:func:`compressed_bytes`) before it reads a byte, and
:func:`decompress` checks everything it reads.

Layouts (``n`` values in ``T`` tensors, little-endian):

``float16``
    ``n`` IEEE half-precision values (2 bytes each). Values beyond +-65504 do
    not fit; the site refuses to send them.
``bfloat16``
    The top 16 bits of each float32, rounded to nearest (ties to even): the
    float32 range with 8 bits of precision (2 bytes each).
``int8``
    ``T`` float32 scales, then the ``n`` int8 codes in ``[-127, 127]`` as a
    *packed section* (below). A value ``x`` of a tensor with scale
    ``s = max|x| / 127`` is sent as ``floor(x / s + u)`` with ``u`` uniform in
    ``[0, 1)``: stochastic rounding, so the decoded value ``q * s`` is ``x`` on
    average (unbiased) and off by less than ``s``. At most about 4x smaller
    than float32 before deflate; most codes are near 0, so deflate takes
    about a third more off.
``topk``
    Tensors of at most ``k = ceil(topk_fraction * n)`` values (biases,
    normalization weights and statistics, small heads) are sent *dense*, all
    their values, as in Deep Gradient Compression: they are few, and a
    normalization layer goes wrong when its statistics lag. Over the other
    tensors together (``m`` values, the *sparse part*), the
    ``k_m = ceil(topk_fraction * m)`` largest coordinates by magnitude are
    sent: not per tensor, so the budget goes wherever the update is largest.
    The payload is the dense tensors' float32 values in spec order, then the
    ``k_m`` float32 values in increasing position, then the positions in the
    sparse part as a packed section of gaps (the first position, then each
    one's distance from the one before; ``uint16`` when ``m <= 65536``, else
    ``uint32``). The rest is zero; with error feedback (:class:`ErrorFeedback`)
    the site keeps it and adds it to its next update.

A *packed section* is a ``uint32`` length ``L``, then ``L`` bytes: the
section as it is when ``L`` is its raw length, else (``L`` shorter) a zlib
stream (deflate, level 6) that inflates to exactly the raw length. The site
deflates a section only when that makes it shorter; the coordinator refuses a
longer ``L``, a stream that inflates to more or fewer bytes than the raw
length, a truncated stream and bytes after its end, and it never inflates
more than one byte past the raw length (no zip bomb).

Compression runs after the privacy transforms: the DP noise is already in the
update, and compressing it is post-processing (no extra privacy cost).
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from fedcare.errors import ProtocolError
from fedcare.params import ParameterSpec, Parameters, spec_size

__all__ = [
    "COMPRESSED_TENSOR",
    "ErrorFeedback",
    "compress",
    "compressed_bytes",
    "decompress",
    "topk_count",
    "topk_dense",
    "topk_dense_mask",
]

#: The one tensor of a compressed update: the payload bytes, carried bit for bit as float32.
COMPRESSED_TENSOR = "compression.payload"

Method = Literal["float16", "bfloat16", "int8", "topk"]

_METHODS = ("float16", "bfloat16", "int8", "topk")
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_INT8_LEVELS = 127
_DEFLATE_LEVEL = 6  # zlib's default: 0.6 ms for 23,000 int8 codes, within 2 % of level 9's size
_SECTION_HEADER_BYTES = 4  # a packed section's uint32 length


def topk_count(num_values: int, *, fraction: float) -> int:
    """How many coordinates top-k sends: ``ceil(fraction * num_values)``, at least 1.

    Examples
    --------
    >>> topk_count(961, fraction=0.01), topk_count(14, fraction=0.01), topk_count(100, fraction=1.0)
    (10, 1, 100)
    """
    # The small epsilon keeps 0.07 * 100 (7.000000000000001 in binary) at 7.
    return max(1, min(num_values, math.ceil(fraction * num_values - 1e-9)))


def _index_dtype(num_values: int) -> type[np.unsignedinteger]:
    return np.uint16 if num_values <= 2**16 else np.uint32


def topk_dense(spec: ParameterSpec, *, fraction: float) -> tuple[bool, ...]:
    """Which tensors top-k sends dense: those of at most ``topk_count(n, fraction=fraction)`` values.

    The rule reads the spec only, so the site and the coordinator agree on it
    without a byte on the wire.

    Parameters
    ----------
    spec : ParameterSpec
        The model's tensors.
    fraction : float
        The plan's ``topk_fraction``.

    Returns
    -------
    tuple of bool
        One per tensor of ``spec``, in order: ``True`` for dense.

    Examples
    --------
    >>> topk_dense((("conv", (16, 1, 3, 3)), ("norm.weight", (16,)), ("fc", (64, 100))), fraction=0.01)
    (False, True, False)
    """
    k = topk_count(spec_size(spec), fraction=fraction)
    return tuple(int(np.prod(shape, dtype=np.int64)) <= k for _, shape in spec)


def topk_dense_mask(spec: ParameterSpec, *, fraction: float) -> np.ndarray:
    """:func:`topk_dense` per value: a flat boolean mask of the values top-k sends whole.

    Examples
    --------
    >>> topk_dense_mask((("w", (2, 100)), ("b", (2,))), fraction=0.01).tolist()[-4:]
    [False, False, True, True]
    """
    return _topk_layout(spec, fraction)[0]


def _topk_layout(spec: ParameterSpec, fraction: float) -> tuple[np.ndarray, int]:
    """A per-value mask of the dense tensors, and how many coordinates of the sparse part are sent."""
    sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in spec]
    dense = np.repeat(np.array(topk_dense(spec, fraction=fraction), dtype=bool), sizes)
    sparse = int(dense.size - np.count_nonzero(dense))
    return dense, (topk_count(sparse, fraction=fraction) if sparse else 0)


def compressed_bytes(spec: ParameterSpec, *, method: Method, topk_fraction: float = 0.01) -> int:
    """The most bytes the payload of ``method`` takes for a model of ``spec``, before padding to 4 bytes.

    ``float16`` and ``bfloat16`` payloads are always this long; ``int8`` and
    ``topk`` ones are shorter when deflate shrinks their packed section.

    Parameters
    ----------
    spec : ParameterSpec
        The model's tensors.
    method : {"float16", "bfloat16", "int8", "topk"}
    topk_fraction : float
        ``topk``: the share of coordinates sent.

    Returns
    -------
    int

    Raises
    ------
    ProtocolError
        If ``method`` is not one of the four.

    Examples
    --------
    >>> spec = (("w", (100, 10)), ("b", (10,)))
    >>> [compressed_bytes(spec, method=m) for m in ("float16", "bfloat16", "int8", "topk")]
    [2020, 2020, 1022, 104]
    """
    n = spec_size(spec)
    if method in ("float16", "bfloat16"):
        return 2 * n
    if method == "int8":
        return 4 * len(spec) + _SECTION_HEADER_BYTES + n
    if method == "topk":
        dense, k = _topk_layout(spec, topk_fraction)
        sparse = dense.size - int(np.count_nonzero(dense))
        index_bytes = np.dtype(_index_dtype(sparse)).itemsize
        return 4 * int(np.count_nonzero(dense)) + 4 * k + _SECTION_HEADER_BYTES + index_bytes * k
    raise ProtocolError(f"unknown compression method {method!r}; expected one of {', '.join(_METHODS)}")


def compress(
    values: np.ndarray,
    spec: ParameterSpec,
    *,
    method: Method,
    topk_fraction: float = 0.01,
    rng: np.random.Generator | None = None,
) -> Parameters:
    """Pack a flat float32 update into one :data:`COMPRESSED_TENSOR`.

    Parameters
    ----------
    values : numpy.ndarray
        The update, flat float32 in ``spec`` order; read only.
    spec : ParameterSpec
        The model's tensors.
    method : {"float16", "bfloat16", "int8", "topk"}
    topk_fraction : float
        ``topk``: the share of coordinates sent, in (0, 1].
    rng : numpy.random.Generator, optional
        ``int8``: the stochastic rounding's randomness (needed for ``int8``).

    Returns
    -------
    Parameters
        One float32 tensor holding the payload's bytes.

    Raises
    ------
    ProtocolError
        If ``values`` does not match ``spec``, holds NaN or Inf, or (float16)
        exceeds the half-precision range.

    Examples
    --------
    >>> spec = (("w", (4,)),)
    >>> update = np.array([0.5, -0.25, 0.0, 1.0], dtype=np.float32)
    >>> packed = compress(update, spec, method="float16")
    >>> packed.spec, packed.nbytes
    ((('compression.payload', (2,)),), 8)
    >>> decompress(packed, spec, method="float16").flatten().tolist()
    [0.5, -0.25, 0.0, 1.0]
    """
    values = np.asarray(values)
    if values.dtype != np.float32 or values.ndim != 1 or values.size != spec_size(spec):
        raise ProtocolError(
            f"compression needs the flat float32 update of {spec_size(spec)} values, got shape {values.shape} "
            f"and dtype {values.dtype}"
        )
    if not np.isfinite(values).all():
        raise ProtocolError("the update holds NaN or Inf values; it cannot be compressed")
    if method == "float16":
        largest = float(np.abs(values).max(initial=0.0))
        if largest > _FLOAT16_MAX:
            raise ProtocolError(
                f"the update has a value of magnitude {largest:.4g}, beyond float16's {_FLOAT16_MAX:g}; "
                "use compression.method: bfloat16 (float32's range)",
            )
        payload = values.astype("<f2").tobytes()
    elif method == "bfloat16":
        payload = _to_bfloat16(values).astype("<u2").tobytes()
    elif method == "int8":
        if rng is None:
            raise ProtocolError("int8 compression rounds at random and needs an rng")
        payload = _int8_encode(values, spec, rng)
    elif method == "topk":
        payload = _topk_encode(values, spec, topk_fraction)
    else:
        raise ProtocolError(f"unknown compression method {method!r}; expected one of {', '.join(_METHODS)}")
    padded = payload + b"\0" * (-len(payload) % 4)
    words = np.frombuffer(padded, dtype="<f4").astype(np.float32)  # a copy: writeable, native order
    return Parameters.from_flat(words, ((COMPRESSED_TENSOR, (words.size,)),))


def decompress(
    parameters: Parameters, spec: ParameterSpec, *, method: Method, topk_fraction: float = 0.01
) -> Parameters:
    """Unpack a compressed update into the model's tensors, checking every value it reads.

    Parameters
    ----------
    parameters : Parameters
        What the site sent: one :data:`COMPRESSED_TENSOR`.
    spec : ParameterSpec
        The model's tensors.
    method : {"float16", "bfloat16", "int8", "topk"}
        The plan's method.
    topk_fraction : float
        The plan's ``topk_fraction``.

    Returns
    -------
    Parameters
        The decoded update, float32 in ``spec`` order.

    Raises
    ------
    ProtocolError
        If the update is not one tensor of the length its layout gives, its
        padding is not zero, a packed section is malformed (too long, not
        inflating to exactly its length, truncated, trailing bytes), an int8
        scale is negative or not finite, an int8 code is -128, top-k
        positions are out of range or not strictly increasing, or a decoded
        value is NaN or Inf.

    Examples
    --------
    >>> spec = (("w", (3,)),)
    >>> packed = compress(np.array([0.0, 3.0, -1.0], np.float32), spec, method="topk", topk_fraction=0.34)
    >>> decompress(packed, spec, method="topk", topk_fraction=0.34).flatten().tolist()
    [0.0, 3.0, -1.0]
    >>> decompress(packed, spec, method="topk", topk_fraction=0.2)
    Traceback (most recent call last):
    ...
    fedcare.errors.ProtocolError: a topk update for this model is one tensor compression.payload of at most 3 words, got compression.payload[4]
    """
    size = compressed_bytes(spec, method=method, topk_fraction=topk_fraction)
    words = -(-size // 4)
    fixed = method in ("float16", "bfloat16")  # always this long; int8 and topk are at most this long
    shape = parameters.spec[0][1] if len(parameters.spec) == 1 and parameters.spec[0][0] == COMPRESSED_TENSOR else ()
    if len(shape) != 1 or shape[0] > words or (fixed and shape[0] != words):
        got = ", ".join(f"{name}[{', '.join(map(str, shape))}]" for name, shape in parameters.spec[:3]) or "nothing"
        length = f"[{words}]" if fixed else f" of at most {words} words"
        raise ProtocolError(f"a {method} update for this model is one tensor {COMPRESSED_TENSOR}{length}, got {got}")
    raw = parameters.flatten().astype("<f4", copy=False).tobytes()
    n = spec_size(spec)
    decoded: np.ndarray | None
    if method == "float16":
        decoded, end = np.frombuffer(raw, dtype="<f2", count=n).astype(np.float32), size
    elif method == "bfloat16":
        decoded, end = (np.frombuffer(raw, dtype="<u2", count=n).astype(np.uint32) << 16).view(np.float32), size
    elif method == "int8":
        decoded, end = _int8_decode(raw, spec)
    else:
        decoded, end = _topk_decode(raw, spec, topk_fraction)
    if decoded is None or len(raw) != 4 * -(-end // 4):
        raise ProtocolError(
            f"the {method} update's layout takes {end} bytes ({-(-end // 4)} words), got {len(raw) // 4} words"
        )
    if any(raw[end:]):
        raise ProtocolError(f"the {method} update's padding after byte {end} is not zero")
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(decoded)
    if not finite.all():
        raise ProtocolError(f"the {method} update decodes to {int(np.count_nonzero(~finite))} non-finite values (NaN or Inf)")
    return Parameters.from_flat(np.ascontiguousarray(decoded, dtype=np.float32), spec)


def _pack_section(data: bytes) -> bytes:
    """``data`` as a packed section: its uint32 length and itself, or deflated when that is shorter."""
    deflated = zlib.compress(data, _DEFLATE_LEVEL)
    body = deflated if len(deflated) < len(data) else data
    return np.array([len(body)], dtype="<u4").tobytes() + body


def _read_section(raw: bytes, offset: int, length: int, *, what: str) -> tuple[bytes, int]:
    """The ``length`` bytes of the packed section at ``offset`` of ``raw``, and the offset after it."""
    if len(raw) < offset + _SECTION_HEADER_BYTES:
        raise ProtocolError(f"the {what} section's length is missing: the payload ends at byte {len(raw)}")
    stored = int(np.frombuffer(raw, dtype="<u4", count=1, offset=offset)[0])
    start = offset + _SECTION_HEADER_BYTES
    if stored > length or start + stored > len(raw):
        raise ProtocolError(
            f"the {what} section says it is {stored} bytes long; it is at most {length} "
            f"and the payload has {len(raw) - start} bytes left"
        )
    body = raw[start : start + stored]
    return (body if stored == length else _inflate(body, length, what=what)), start + stored


def _inflate(stream: bytes, length: int, *, what: str) -> bytes:
    """A zlib stream inflated to exactly ``length`` bytes, never more than one byte past it."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(stream, length + 1)  # bounded: a zip bomb stops one byte past the length
    except zlib.error as error:
        raise ProtocolError(f"the {what} section is not a valid zlib stream ({error})") from None
    if len(data) > length:
        raise ProtocolError(f"the {what} section inflates to more than its {length} bytes; refused")
    if not inflater.eof:
        raise ProtocolError(f"the {what} section's zlib stream is truncated after {len(data)} of {length} bytes")
    if inflater.unused_data:
        raise ProtocolError(f"the {what} section has {len(inflater.unused_data)} bytes after its zlib stream")
    if len(data) < length:
        raise ProtocolError(f"the {what} section inflates to {len(data)} bytes, not its {length}")
    return data


def _to_bfloat16(values: np.ndarray) -> np.ndarray:
    """The top 16 bits of each float32, rounded to nearest with ties to even (finite input)."""
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def _int8_encode(values: np.ndarray, spec: ParameterSpec, rng: np.random.Generator) -> bytes:
    scales = np.empty(len(spec), dtype=np.float32)
    codes = np.empty(values.size, dtype=np.int8)
    offset = 0
    for index, (_, shape) in enumerate(spec):
        size = int(np.prod(shape, dtype=np.int64))
        part = values[offset : offset + size].astype(np.float64)
        largest = float(np.abs(part).max(initial=0.0))
        scale = np.float32(largest / _INT8_LEVELS)
        if scale > 0 and largest / float(scale) > _INT8_LEVELS:
            scale = np.nextafter(scale, np.float32(np.inf))  # float32 rounding must not push a code past 127
        scales[index] = scale
        if scale > 0:
            level = part / float(scale)
            level = np.floor(level + rng.random(size))  # stochastic rounding: E[level] = part / scale
            codes[offset : offset + size] = np.clip(level, -_INT8_LEVELS, _INT8_LEVELS).astype(np.int8)
        else:
            codes[offset : offset + size] = 0
        offset += size
    return scales.astype("<f4").tobytes() + _pack_section(codes.tobytes())


def _int8_decode(raw: bytes, spec: ParameterSpec) -> tuple[np.ndarray | None, int]:
    count = len(spec)
    if len(raw) < 4 * count:
        return None, 4 * count + _SECTION_HEADER_BYTES
    scales = np.frombuffer(raw, dtype="<f4", count=count).astype(np.float32)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        bad = [float(s) for s in scales if not (np.isfinite(s) and s >= 0)][:3]
        raise ProtocolError(f"an int8 update's per-tensor scales must be finite and >= 0, got {bad}")
    n = spec_size(spec)
    section, end = _read_section(raw, 4 * count, n, what="int8 codes")
    codes = np.frombuffer(section, dtype=np.int8, count=n)
    if (codes == -128).any():
        raise ProtocolError(f"an int8 update's codes must lie in [-127, 127]; {int((codes == -128).sum())} are -128")
    sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in spec]
    with np.errstate(over="ignore", invalid="ignore"):
        return codes.astype(np.float32) * np.repeat(scales, sizes), end


def _topk_encode(values: np.ndarray, spec: ParameterSpec, fraction: float) -> bytes:
    dense, k = _topk_layout(spec, fraction)
    sparse = values[~dense]
    m = sparse.size
    positions = np.sort(np.argpartition(np.abs(sparse), m - k)[m - k :]) if k < m else np.arange(m)
    gaps = np.diff(positions, prepend=0)  # the first position, then the distance from the one before
    index_dtype = np.dtype(_index_dtype(m)).newbyteorder("<")
    head: bytes = values[dense].astype("<f4").tobytes() + sparse[positions].astype("<f4").tobytes()
    return head + _pack_section(gaps.astype(index_dtype).tobytes())


def _topk_decode(raw: bytes, spec: ParameterSpec, fraction: float) -> tuple[np.ndarray | None, int]:
    dense, k = _topk_layout(spec, fraction)
    d = int(np.count_nonzero(dense))
    m = dense.size - d
    index_dtype = np.dtype(_index_dtype(m)).newbyteorder("<")
    head = 4 * (d + k)
    if len(raw) < head:
        return None, head + _SECTION_HEADER_BYTES
    section, end = _read_section(raw, head, k * index_dtype.itemsize, what="topk positions")
    gaps = np.frombuffer(section, dtype=index_dtype, count=k).astype(np.int64)
    positions = np.cumsum(gaps)
    if k and ((gaps[1:] == 0).any() or positions[-1] >= m):
        outside = int(np.count_nonzero(positions >= m))
        raise ProtocolError(
            f"a topk update's positions must be strictly increasing and below {m} (the sparse part's size); "
            f"{outside} are out of range" + ("" if outside else ", or they repeat")
        )
    decoded = np.zeros(dense.size, dtype=np.float32)
    decoded[dense] = np.frombuffer(raw, dtype="<f4", count=d)
    part = np.zeros(m, dtype=np.float32)
    part[positions] = np.frombuffer(raw, dtype="<f4", count=k, offset=4 * d)
    decoded[~dense] = part
    return decoded, end


class ErrorFeedback:
    """What a site's compression left out, added back to its next update (error feedback).

    The site compresses ``update + residual`` and keeps
    ``residual = update + residual - decoded`` for the next round, so nothing
    is lost, only delayed: the sum of what it sent over ``R`` rounds differs
    from the sum of its true updates by the last residual only. With a
    ``path`` the residual is saved there (safetensors, atomically) after every
    round and read back by a restarted node of the same run; a new run starts
    from zero. The residual is kept when the site returns its result, even if
    the coordinator later refuses it (late or malformed).

    Parameters
    ----------
    path : Path, optional
        Where to save the residual; without it the residual lives in memory only.

    Examples
    --------
    >>> spec = (("w", (4,)),)
    >>> feedback = ErrorFeedback()
    >>> update = np.array([1.0, 0.75, 0.0, 0.125], dtype=np.float32)
    >>> sent = [feedback.compress(update, spec, run_id="r", method="topk", topk_fraction=0.25) for _ in range(3)]
    >>> [decompress(s, spec, method="topk", topk_fraction=0.25).flatten().tolist() for s in sent]
    [[1.0, 0.0, 0.0, 0.0], [0.0, 1.5, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]
    >>> feedback.residual.tolist()
    [0.0, 0.75, 0.0, 0.375]
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._residual: np.ndarray | None = None
        self._run_id: str | None = None

    @property
    def residual(self) -> np.ndarray | None:
        """The part not sent yet (float32, flat), or ``None`` before the first round."""
        return None if self._residual is None else self._residual.copy()

    def compress(
        self,
        values: np.ndarray,
        spec: ParameterSpec,
        *,
        run_id: str,
        method: Method,
        topk_fraction: float = 0.01,
        rng: np.random.Generator | None = None,
    ) -> Parameters:
        """Compress ``values + residual`` (see :func:`compress`) and keep what was left out."""
        residual = self._current(run_id, values.size)
        corrected = np.add(values, residual, dtype=np.float32)
        packed = compress(corrected, spec, method=method, topk_fraction=topk_fraction, rng=rng)
        sent = decompress(packed, spec, method=method, topk_fraction=topk_fraction).flatten()
        self._residual = np.subtract(corrected, sent, dtype=np.float32)
        self._save()
        return packed

    def _current(self, run_id: str, size: int) -> np.ndarray:
        if self._residual is None or self._run_id != run_id:
            self._residual, self._run_id = self._saved(run_id, size), run_id
        if self._residual.size != size:
            self._residual = np.zeros(size, dtype=np.float32)
        return self._residual

    def _saved(self, run_id: str, size: int) -> np.ndarray:
        """The residual saved for ``run_id``, or zeros."""
        if self.path is None or not self.path.exists():
            return np.zeros(size, dtype=np.float32)
        from safetensors import safe_open

        # safetensors, not pickle: the file is only ever read as plain arrays.
        with safe_open(str(self.path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("run_id") != run_id or "residual" not in handle.keys():
                return np.zeros(size, dtype=np.float32)
            saved = np.asarray(handle.get_tensor("residual"), dtype=np.float32)
        if saved.size != size or not np.isfinite(saved).all():
            return np.zeros(size, dtype=np.float32)
        return saved.copy()

    def _save(self) -> None:
        if self.path is None or self._residual is None:
            return
        from safetensors.numpy import save

        from fedcare.federation.rundir import atomic_write

        atomic_write(self.path, save({"residual": self._residual}, metadata={"run_id": self._run_id or ""}))
