"""Shamir secret sharing of 32-byte secrets over the prime field GF(2**521 - 1).

A secret ``s`` (32 bytes, read as a big-endian integer below ``2**256``) is the
constant term of a random polynomial ``f`` of degree ``threshold - 1`` over
GF(p), p = 2**521 - 1 (a Mersenne prime, so every 32-byte secret fits). The
share for holder ``x`` is ``(x, f(x))``. Any ``threshold`` shares give ``f(0)``
back by Lagrange interpolation; fewer are consistent with every secret, so
they say nothing about it.

Holders are numbered by positive integers (in SecAgg, the node index), which
are the x-coordinates of their shares; ``f(x)`` travels as 66 big-endian bytes.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from fedcare.errors import ConfigError, ProtocolError

__all__ = ["PRIME", "SECRET_BYTES", "SHARE_BYTES", "Share", "reconstruct", "split"]

#: The field modulus, the Mersenne prime 2**521 - 1.
PRIME = (1 << 521) - 1
#: Length of a secret in bytes.
SECRET_BYTES = 32
#: Length of a share's value ``f(x)`` in bytes (521 bits, rounded up).
SHARE_BYTES = 66


@dataclass(frozen=True)
class Share:
    """One holder's share of a secret.

    Attributes
    ----------
    x : int
        The holder's number, the point the polynomial was evaluated at (>= 1).
    y : bytes
        ``f(x)`` as :data:`SHARE_BYTES` big-endian bytes.

    Examples
    --------
    >>> share = split(bytes(32), holders=[1, 2], threshold=2)[0]
    >>> share.x, len(share.y)
    (1, 66)
    """

    x: int
    y: bytes


def _random_coefficient(rng: np.random.Generator | None) -> int:
    if rng is None:
        return secrets.randbelow(PRIME)
    # Test-only path: reproducible, with a bias of about 2**-7 on the top bits, which
    # does not matter for a reproducible test but would for a real secret.
    return int.from_bytes(rng.bytes(SHARE_BYTES), "big") % PRIME


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """Horner's rule for sum(coefficients[i] * x**i) mod PRIME."""
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % PRIME
    return value


def split(
    secret: bytes,
    *,
    holders: Iterable[int],
    threshold: int,
    rng: np.random.Generator | None = None,
) -> tuple[Share, ...]:
    """Split a 32-byte secret into one share per holder; any ``threshold`` rebuild it.

    Parameters
    ----------
    secret : bytes
        The secret, exactly :data:`SECRET_BYTES` (32) bytes.
    holders : iterable of int
        Distinct holder numbers, each in ``[1, 2**31)``; one share each, in this order.
    threshold : int
        How many shares rebuild the secret (>= 1, <= number of holders).
    rng : numpy.random.Generator, optional
        Source of the polynomial's coefficients, for reproducible tests only.
        Leave it ``None`` for real secrets: the coefficients then come from the
        operating system (:mod:`secrets`).

    Returns
    -------
    tuple of Share

    Raises
    ------
    ConfigError
        If the secret is not 32 bytes, holders repeat or are out of range, or the
        threshold is not between 1 and the number of holders.

    Examples
    --------
    >>> shares = split(b"k" * 32, holders=range(1, 6), threshold=3)
    >>> reconstruct(shares[:3]) == b"k" * 32
    True
    >>> reconstruct([shares[4], shares[0], shares[2]]) == b"k" * 32
    True
    """
    if len(secret) != SECRET_BYTES:
        raise ConfigError(f"must be {SECRET_BYTES} bytes, got {len(secret)}", field="secret")
    xs = list(holders)
    if len(set(xs)) != len(xs) or any(not 1 <= x < (1 << 31) for x in xs):
        raise ConfigError("must be distinct integers in [1, 2**31)", field="holders")
    if not 1 <= threshold <= len(xs):
        raise ConfigError(f"must be between 1 and the {len(xs)} holders, got {threshold}", field="threshold")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [_random_coefficient(rng) for _ in range(threshold - 1)]
    return tuple(Share(x=x, y=_evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big")) for x in xs)


def _interpolate_at_zero(points: Sequence[tuple[int, int]]) -> int:
    """Lagrange interpolation at 0: sum_i y_i * prod_{j != i} x_j / (x_j - x_i) mod PRIME."""
    total = 0
    for i, (x_i, y_i) in enumerate(points):
        numerator = 1
        denominator = 1
        for j, (x_j, _) in enumerate(points):
            if j != i:
                numerator = numerator * x_j % PRIME
                denominator = denominator * (x_j - x_i) % PRIME
        total = (total + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def reconstruct(shares: Sequence[Share]) -> bytes:
    """Rebuild a secret from at least ``threshold`` of its shares.

    All the shares given are used: with more than ``threshold`` consistent
    shares the result is the same. With fewer than ``threshold`` shares (or
    shares of different secrets) the interpolated value is unrelated to the
    secret and, with overwhelming probability, does not fit in 32 bytes, which
    is reported as an error.

    Parameters
    ----------
    shares : sequence of Share
        Shares with distinct ``x``.

    Returns
    -------
    bytes
        The 32-byte secret.

    Raises
    ------
    ProtocolError
        If there are no shares, ``x`` values repeat or are out of range, a ``y``
        is malformed, or the interpolated value is not a 32-byte secret (too few
        or inconsistent shares).

    Examples
    --------
    >>> shares = split(bytes(range(32)), holders=[3, 7, 9], threshold=2)
    >>> reconstruct(shares[1:]) == bytes(range(32))
    True
    """
    if not shares:
        raise ProtocolError("no shares given; need at least the threshold", field="shares")
    points: list[tuple[int, int]] = []
    for share in shares:
        if len(share.y) != SHARE_BYTES:
            raise ProtocolError(f"share value must be {SHARE_BYTES} bytes, got {len(share.y)}", field="shares.y")
        y = int.from_bytes(share.y, "big")
        if not 1 <= share.x < (1 << 31) or y >= PRIME:
            raise ProtocolError("share out of range: x must be in [1, 2**31) and y below the prime", field="shares")
        points.append((share.x, y))
    if len({x for x, _ in points}) != len(points):
        raise ProtocolError("two shares have the same x; each holder gives one share", field="shares.x")
    secret = _interpolate_at_zero(points)
    if secret >> (8 * SECRET_BYTES):
        raise ProtocolError(
            f"the {len(points)} shares do not rebuild a 32-byte secret: too few or inconsistent shares",
            field="shares",
        )
    return secret.to_bytes(SECRET_BYTES, "big")
