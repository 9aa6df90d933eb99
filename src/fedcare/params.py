"""Model parameters as an ordered mapping of names to float32 arrays."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedcare.errors import ProtocolError

__all__ = ["ParameterSpec", "Parameters", "update_digest"]

#: ``(name, shape)`` for each tensor, in order.
ParameterSpec = tuple[tuple[str, tuple[int, ...]], ...]

_ORDER_KEY = "fedcare.order"


class Parameters(Mapping[str, np.ndarray]):
    """An ordered, read-only mapping of tensor names to float32 arrays.

    Parameters built with :meth:`from_flat` are views into one contiguous
    vector, so :meth:`flatten` returns that vector without copying; this is the
    form every transport and strategy works on.

    Parameters
    ----------
    arrays : Mapping[str, array_like]
        Tensors in model order. Floating arrays are converted to float32
        (copied only when the dtype or layout requires it).

    Raises
    ------
    ProtocolError
        If a tensor is not a floating-point array or a name is empty.

    Examples
    --------
    >>> import numpy as np
    >>> p = Parameters({"w": np.ones((2, 3)), "b": np.zeros(3)})
    >>> p.spec
    (('w', (2, 3)), ('b', (3,)))
    >>> flat = p.flatten()
    >>> flat.shape, flat.dtype
    ((9,), dtype('float32'))
    >>> q = Parameters.from_flat(flat * 2, p.spec)
    >>> float(q["w"][0, 0])
    2.0
    >>> Parameters.from_bytes(q.to_bytes()).spec == p.spec
    True
    """

    __slots__ = ("_arrays", "_flat")

    def __init__(self, arrays: Mapping[str, npt.ArrayLike]) -> None:
        converted: dict[str, np.ndarray] = {}
        for name, value in arrays.items():
            if not isinstance(name, str) or not name:
                raise ProtocolError(f"tensor names must be non-empty strings, got {name!r}")
            array = np.asarray(value)
            if not np.issubdtype(array.dtype, np.floating):
                raise ProtocolError(
                    f"tensor {name!r} has dtype {array.dtype}; parameters must be floating point "
                    "(leave integer buffers such as batch counters out of the parameters)"
                )
            converted[name] = np.require(array, dtype=np.float32, requirements="C")
        self._arrays = converted
        self._flat: np.ndarray | None = None

    @classmethod
    def from_flat(cls, vector: np.ndarray, spec: ParameterSpec) -> Parameters:
        """Build parameters whose tensors are views into ``vector``.

        Parameters
        ----------
        vector : numpy.ndarray
            A one-dimensional float32 array with exactly as many elements as
            ``spec`` describes. It is not copied.
        spec : ParameterSpec
            ``(name, shape)`` pairs in order.

        Returns
        -------
        Parameters

        Raises
        ------
        ProtocolError
            If the vector is not 1-D float32 or its length does not match.
        """
        if vector.ndim != 1 or vector.dtype != np.float32:
            raise ProtocolError(
                f"a flat parameter vector must be 1-D float32, got shape {vector.shape} "
                f"and dtype {vector.dtype}"
            )
        expected = spec_size(spec)
        if vector.size != expected:
            raise ProtocolError(
                f"flat parameter vector has {vector.size} elements, the model has {expected}"
            )
        if not vector.flags.c_contiguous:
            vector = np.ascontiguousarray(vector)
        self = cls.__new__(cls)
        arrays: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape in spec:
            size = int(np.prod(shape, dtype=np.int64))
            arrays[name] = vector[offset : offset + size].reshape(shape)
            offset += size
        self._arrays = arrays
        self._flat = vector
        return self

    @property
    def spec(self) -> ParameterSpec:
        """``(name, shape)`` for each tensor, in order."""
        return tuple((name, tuple(int(d) for d in a.shape)) for name, a in self._arrays.items())

    @property
    def num_elements(self) -> int:
        """Total number of scalars."""
        return sum(int(a.size) for a in self._arrays.values())

    @property
    def nbytes(self) -> int:
        """Size of the tensors in bytes."""
        return 4 * self.num_elements

    def flatten(self) -> np.ndarray:
        """Return all tensors as one contiguous float32 vector.

        Returns
        -------
        numpy.ndarray
            The backing vector itself when the parameters were built with
            :meth:`from_flat` (no copy); otherwise a new vector, which the
            tensors are then re-pointed to so later calls do not copy again.
        """
        if self._flat is None:
            flat = np.empty(self.num_elements, dtype=np.float32)
            offset = 0
            views: dict[str, np.ndarray] = {}
            for name, array in self._arrays.items():
                size = array.size
                flat[offset : offset + size] = array.reshape(-1)
                views[name] = flat[offset : offset + size].reshape(array.shape)
                offset += size
            self._arrays = views
            self._flat = flat
        return self._flat

    def freeze(self) -> Parameters:
        """Mark every tensor read-only, so a receiver cannot change a shared copy.

        Returns
        -------
        Parameters
            ``self``, for chaining.
        """
        flat = self.flatten()
        flat.flags.writeable = False
        for array in self._arrays.values():
            array.flags.writeable = False
        return self

    def copy(self) -> Parameters:
        """Return a deep, writeable copy."""
        return Parameters.from_flat(self.flatten().copy(), self.spec)

    def to_bytes(self) -> bytes:
        """Serialize with safetensors (no pickle), keeping the tensor order.

        Returns
        -------
        bytes
        """
        from safetensors.numpy import save

        metadata = {_ORDER_KEY: json.dumps(list(self._arrays))}
        return save(dict(self._arrays), metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int | None = None) -> Parameters:
        """Parse safetensors bytes produced by :meth:`to_bytes`.

        Parameters
        ----------
        data : bytes
            The serialized parameters.
        max_bytes : int, optional
            Refuse payloads larger than this before parsing anything.

        Returns
        -------
        Parameters

        Raises
        ------
        ProtocolError
            If the payload is too large, not valid safetensors or not float32.
        """
        if max_bytes is not None and len(data) > max_bytes:
            raise ProtocolError(
                f"parameter payload is {len(data)} bytes, above the limit of {max_bytes} bytes"
            )
        from safetensors.numpy import load

        try:
            arrays = load(data)
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len])
        except Exception as exc:  # safetensors raises its own error types
            raise ProtocolError(f"parameter payload is not valid safetensors: {exc}") from exc
        metadata = header.get("__metadata__") or {}
        try:
            order = json.loads(metadata[_ORDER_KEY]) if _ORDER_KEY in metadata else sorted(arrays)
        except ValueError:
            raise ProtocolError("parameter payload's tensor order is not a JSON list") from None
        if (
            not isinstance(order, list)
            or not all(isinstance(name, str) for name in order)
            or sorted(order) != sorted(arrays)
        ):
            raise ProtocolError("parameter payload's tensor order does not match its tensors")
        for name in order:
            if arrays[name].dtype != np.float32:
                raise ProtocolError(f"tensor {name!r} is {arrays[name].dtype}, expected float32")
        return cls({name: arrays[name] for name in order})

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        return f"Parameters({len(self)} tensors, {self.num_elements} values)"


def spec_size(spec: ParameterSpec) -> int:
    """Number of scalars a spec describes."""
    return sum(int(np.prod(shape, dtype=np.int64)) for _, shape in spec)


def spec_to_json(spec: ParameterSpec) -> list[list[Any]]:
    """A JSON-able form of a spec."""
    return [[name, list(shape)] for name, shape in spec]


def spec_from_json(value: Sequence[Sequence[Any]]) -> ParameterSpec:
    """Inverse of :func:`spec_to_json`."""
    return tuple((str(name), tuple(int(d) for d in shape)) for name, shape in value)


def update_digest(parameters: Parameters) -> tuple[int, str]:
    """Size in bytes and SHA-256 (hex) of ``parameters`` as safetensors bytes: what audit logs record.

    The node that sends an update and the coordinator that receives it both
    compute this, so their audit logs can be checked against each other.

    Examples
    --------
    >>> import numpy as np
    >>> size, digest = update_digest(Parameters({"w": np.zeros(4, np.float32)}))
    >>> size > 16, len(digest)
    (True, 64)
    """
    import hashlib

    data = parameters.to_bytes()
    return len(data), hashlib.sha256(data).hexdigest()
