"""Masks: pseudorandom ``uint32`` vectors expanded from 32-byte keys with AES-256-CTR.

A mask is the keystream of AES-256 in counter mode (initial counter block 0)
under the full 32-byte key, read as little-endian ``uint32``: the same key
gives the same mask on every machine. Keys are never reused across rounds (they
come from a fresh key agreement or a fresh seed, through HKDF with the session),
so a zero counter is safe.

:func:`apply_masks` adds and subtracts many masks from one vector in place,
modulo ``2**32``. It walks the vector in 256 KiB blocks and, for each block,
runs every key's keystream over it, so both the block and the keystream stay in
cache and no mask-sized temporary is made.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from fedcare.errors import ConfigError

__all__ = ["KEY_BYTES", "apply_masks", "expand_mask"]

#: Length of a mask key in bytes (AES-256).
KEY_BYTES = 32
_BLOCK_WORDS = 1 << 16  # 256 KiB of uint32 per step
_AES_BLOCK = 16


def _keystream(key: bytes, *, start_word: int = 0) -> CipherContext:
    if len(key) != KEY_BYTES:
        raise ConfigError(f"mask key must be {KEY_BYTES} bytes, got {len(key)}", field="key")
    if (start_word * 4) % _AES_BLOCK:
        raise ConfigError("start must be a multiple of 4 words (one AES block)", field="start_word")
    counter = (start_word * 4 // _AES_BLOCK).to_bytes(_AES_BLOCK, "big")
    return Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()


def expand_mask(key: bytes, length: int) -> np.ndarray:
    """The mask of ``length`` ``uint32`` values for ``key``.

    Parameters
    ----------
    key : bytes
        32-byte key.
    length : int
        Number of ``uint32`` values (>= 0).

    Returns
    -------
    numpy.ndarray
        A new ``uint32`` array.

    Raises
    ------
    ConfigError
        If the key is not 32 bytes or the length is negative.

    Examples
    --------
    >>> mask = expand_mask(bytes(32), 4)
    >>> mask.dtype.name, len(mask)
    ('uint32', 4)
    >>> bool((expand_mask(bytes(32), 8)[:4] == mask).all())
    True
    """
    if length < 0:
        raise ConfigError(f"must be >= 0, got {length}", field="length")
    stream = _keystream(key)
    # The keystream is written straight into the result; update_into wants room for
    # one extra AES block, hence the 4 spare words, which the returned view hides.
    buffer = np.empty(length + _AES_BLOCK // 4, dtype="<u4")
    raw = buffer.data.cast("B")
    zeros = memoryview(bytes(min(_BLOCK_WORDS, length) * 4))
    for start in range(0, length, _BLOCK_WORDS):
        count = min(_BLOCK_WORDS, length - start)
        stream.update_into(zeros[: count * 4], raw[start * 4 :])
    return buffer[:length]


def apply_masks(out: np.ndarray, *, add: Sequence[bytes] = (), subtract: Sequence[bytes] = ()) -> None:
    """``out += sum(mask(k) for k in add) - sum(mask(k) for k in subtract)`` modulo 2**32, in place.

    Parameters
    ----------
    out : numpy.ndarray
        1-D C-contiguous ``uint32`` array, changed in place.
    add, subtract : sequence of bytes
        32-byte keys whose masks are added or subtracted.

    Raises
    ------
    ConfigError
        If ``out`` is not a 1-D contiguous ``uint32`` array or a key is not 32 bytes.

    Examples
    --------
    >>> x = np.arange(5, dtype=np.uint32)
    >>> apply_masks(x, add=[b"a" * 32, b"b" * 32])
    >>> bool((x == np.arange(5)).all())
    False
    >>> apply_masks(x, subtract=[b"b" * 32, b"a" * 32])
    >>> x.tolist()
    [0, 1, 2, 3, 4]
    """
    if out.dtype != np.uint32 or out.ndim != 1 or not out.flags.c_contiguous:
        raise ConfigError(f"must be a 1-D contiguous uint32 array, got {out.dtype} {out.shape}", field="out")
    streams = [(_keystream(key), np.add) for key in add] + [(_keystream(key), np.subtract) for key in subtract]
    if not streams or out.size == 0:
        return
    words = min(_BLOCK_WORDS, out.size)
    zeros = memoryview(bytes(words * 4))
    # update_into wants room for one extra AES block; the view below ignores it.
    scratch_bytes = bytearray(words * 4 + _AES_BLOCK - 1)
    scratch = np.frombuffer(scratch_bytes, dtype="<u4", count=words)
    for start in range(0, out.size, words):
        stop = min(start + words, out.size)
        count = stop - start
        block = out[start:stop]
        for stream, combine in streams:
            stream.update_into(zeros[: count * 4], scratch_bytes)
            combine(block, scratch[:count], out=block)
