"""Shamir sharing of 32-byte secrets over GF(2**521 - 1): known vectors, properties, malformed input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.errors import ConfigError, ProtocolError
from fedcare.privacy.secagg.shamir import PRIME, SECRET_BYTES, SHARE_BYTES, Share, reconstruct, split

P = 2**521 - 1
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)

secrets_32 = st.binary(min_size=SECRET_BYTES, max_size=SECRET_BYTES)


def _share(x: int, y: int) -> Share:
    return Share(x=x, y=y.to_bytes(SHARE_BYTES, "big"))


def _poly(coefficients: list[int], x: int) -> int:
    """f(x) = sum c_i x**i mod P, written out independently of the module's Horner loop."""
    return sum(c * pow(x, i, P) for i, c in enumerate(coefficients)) % P


@st.composite
def secret_and_shares(draw: st.DrawFn) -> tuple[bytes, int, tuple[Share, ...]]:
    secret = draw(secrets_32)
    n = draw(st.integers(min_value=1, max_value=20))
    t = draw(st.integers(min_value=1, max_value=n))
    holders = draw(
        st.lists(st.integers(min_value=1, max_value=2**31 - 1), min_size=n, max_size=n, unique=True)
    )
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    shares = split(secret, holders=holders, threshold=t, rng=np.random.default_rng(seed))
    return secret, t, shares


# -- known vectors -------------------------------------------------------------------


def test_prime_is_the_mersenne_prime_2_521_minus_1():
    assert PRIME == P
    assert SHARE_BYTES * 8 >= 521 and SECRET_BYTES == 32


def test_textbook_example_reconstructs_1234_from_any_three_shares():
    # f(x) = 1234 + 166 x + 94 x**2, the example worked in most textbooks:
    # f(1) = 1494, f(2) = 1942, f(3) = 2578, f(4) = 3402, f(5) = 4414, f(6) = 5614.
    points = {1: 1494, 2: 1942, 3: 2578, 4: 3402, 5: 4414, 6: 5614}
    assert all(1234 + 166 * x + 94 * x * x == y for x, y in points.items())
    expected = (1234).to_bytes(SECRET_BYTES, "big")
    for chosen in itertools.combinations(points, 3):
        assert reconstruct([_share(x, points[x]) for x in chosen]) == expected


def test_textbook_example_with_all_six_shares_reconstructs_the_same_secret():
    points = {1: 1494, 2: 1942, 3: 2578, 4: 3402, 5: 4414, 6: 5614}
    assert reconstruct([_share(x, y) for x, y in points.items()]) == (1234).to_bytes(SECRET_BYTES, "big")


def test_hand_worked_polynomial_whose_values_wrap_the_prime_reconstructs():
    # f(x) = s + (P - 1) x  =  s - x  (mod P): f(1) = s - 1, f(2) = s - 2.
    s = 10
    shares = [_share(1, s - 1), _share(2, s - 2)]
    assert reconstruct(shares) == s.to_bytes(SECRET_BYTES, "big")
    # f(x) = 3 + (P - 5) x: f(7) = 3 - 35 = P - 32, a value that only makes sense modulo P.
    assert reconstruct([_share(7, P - 32), _share(1, P - 2)]) == (3).to_bytes(SECRET_BYTES, "big")


def test_split_evaluates_the_polynomial_drawn_from_the_generator():
    secret = bytes(range(32))
    seed = 1234
    holders = [1, 2, 3, 5, 8, 13]
    shares = split(secret, holders=holders, threshold=4, rng=np.random.default_rng(seed))
    # The same generator, read the way the module documents: 66 bytes per coefficient, mod P.
    replay = np.random.default_rng(seed)
    coefficients = [int.from_bytes(secret, "big")] + [int.from_bytes(replay.bytes(66), "big") % P for _ in range(3)]
    assert [s.x for s in shares] == holders
    for share in shares:
        assert len(share.y) == SHARE_BYTES
        assert int.from_bytes(share.y, "big") == _poly(coefficients, share.x)
    assert _poly(coefficients, 0) == int.from_bytes(secret, "big")


def test_split_with_the_same_seed_gives_the_same_shares():
    first = split(b"s" * 32, holders=range(1, 6), threshold=3, rng=np.random.default_rng(7))
    second = split(b"s" * 32, holders=range(1, 6), threshold=3, rng=np.random.default_rng(7))
    assert first == second


def test_split_without_a_generator_draws_fresh_coefficients_each_time():
    first = split(b"s" * 32, holders=range(1, 6), threshold=3)
    second = split(b"s" * 32, holders=range(1, 6), threshold=3)
    assert first != second
    assert reconstruct(first[:3]) == reconstruct(second[2:]) == b"s" * 32


def test_threshold_one_hands_every_holder_the_secret_itself():
    shares = split(b"\xff" * 32, holders=[4, 9], threshold=1)
    assert all(int.from_bytes(s.y, "big") == int.from_bytes(b"\xff" * 32, "big") for s in shares)


def test_largest_and_smallest_secret_round_trip():
    for secret in (bytes(32), b"\xff" * 32):
        shares = split(secret, holders=[1, 2**31 - 1, 77], threshold=3)
        assert reconstruct(shares) == secret


# -- properties ----------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(case=secret_and_shares(), data=st.data())
def test_any_threshold_shares_reconstruct_the_secret(case, data):
    secret, t, shares = case
    chosen = data.draw(st.lists(st.sampled_from(shares), min_size=t, max_size=t, unique_by=lambda s: s.x))
    assert reconstruct(chosen) == secret


@PROPERTY_SETTINGS
@given(case=secret_and_shares(), data=st.data())
def test_more_than_threshold_shares_reconstruct_the_secret(case, data):
    secret, t, shares = case
    k = data.draw(st.integers(min_value=t, max_value=len(shares)))
    assert reconstruct(shares[:k]) == secret


@PROPERTY_SETTINGS
@given(case=secret_and_shares(), data=st.data())
def test_reconstruction_does_not_depend_on_share_order(case, data):
    secret, _, shares = case
    shuffled = data.draw(st.permutations(shares))
    assert reconstruct(shuffled) == reconstruct(shares) == secret


@PROPERTY_SETTINGS
@given(case=secret_and_shares(), data=st.data())
def test_fewer_than_threshold_shares_do_not_reconstruct(case, data):
    secret, t, shares = case
    if t < 2:
        return  # one share of a threshold-1 sharing is the secret; nothing to withhold
    k = data.draw(st.integers(min_value=1, max_value=t - 1))
    chosen = data.draw(st.lists(st.sampled_from(shares), min_size=k, max_size=k, unique_by=lambda s: s.x))
    try:
        rebuilt = reconstruct(chosen)
    except ProtocolError as error:
        assert error.field == "shares"
    else:
        assert rebuilt != secret


def test_shares_of_two_secrets_mixed_do_not_reconstruct_either():
    a = split(b"a" * 32, holders=range(1, 6), threshold=3, rng=np.random.default_rng(0))
    b = split(b"b" * 32, holders=range(1, 6), threshold=3, rng=np.random.default_rng(1))
    with pytest.raises(ProtocolError, match="too few or inconsistent"):
        reconstruct([a[0], a[1], b[2]])


# -- malformed shares ----------------------------------------------------------------


def test_reconstruct_refuses_no_shares():
    with pytest.raises(ProtocolError) as error:
        reconstruct([])
    assert error.value.field == "shares"


@pytest.mark.parametrize("length", [0, 32, SHARE_BYTES - 1, SHARE_BYTES + 1])
def test_reconstruct_refuses_share_value_of_wrong_length(length):
    shares = list(split(b"k" * 32, holders=[1, 2, 3], threshold=2))
    shares[1] = Share(x=2, y=b"\x01" * length)
    with pytest.raises(ProtocolError, match=f"got {length}") as error:
        reconstruct(shares)
    assert error.value.field == "shares.y"


def test_reconstruct_refuses_duplicate_x():
    shares = split(b"k" * 32, holders=[1, 2, 3], threshold=2)
    with pytest.raises(ProtocolError) as error:
        reconstruct([shares[0], shares[1], shares[1]])
    assert error.value.field == "shares.x"


def test_reconstruct_refuses_duplicate_x_with_different_values():
    shares = split(b"k" * 32, holders=[1, 2, 3], threshold=2)
    with pytest.raises(ProtocolError) as error:
        reconstruct([shares[0], Share(x=1, y=shares[1].y)])
    assert error.value.field == "shares.x"


@pytest.mark.parametrize("x", [0, -1, 2**31, 2**64])
def test_reconstruct_refuses_x_out_of_range(x):
    shares = list(split(b"k" * 32, holders=[1, 2], threshold=2))
    shares[0] = Share(x=x, y=shares[0].y)
    with pytest.raises(ProtocolError) as error:
        reconstruct(shares)
    assert error.value.field == "shares"


def test_reconstruct_refuses_value_at_or_above_the_prime():
    shares = list(split(b"k" * 32, holders=[1, 2], threshold=2))
    shares[0] = Share(x=1, y=P.to_bytes(SHARE_BYTES, "big"))
    with pytest.raises(ProtocolError) as error:
        reconstruct(shares)
    assert error.value.field == "shares"


# -- split argument errors -----------------------------------------------------------


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_split_refuses_secret_that_is_not_32_bytes(length):
    with pytest.raises(ConfigError, match=f"got {length}") as error:
        split(b"x" * length, holders=[1, 2, 3], threshold=2)
    assert error.value.field == "secret"


@pytest.mark.parametrize("holders", [[1, 2, 2], [0, 1, 2], [-3, 1, 2], [1, 2, 2**31]])
def test_split_refuses_repeated_or_out_of_range_holders(holders):
    with pytest.raises(ConfigError) as error:
        split(b"x" * 32, holders=holders, threshold=2)
    assert error.value.field == "holders"


@pytest.mark.parametrize("threshold", [0, -1, 4])
def test_split_refuses_threshold_outside_one_to_holders(threshold):
    with pytest.raises(ConfigError, match=f"got {threshold}") as error:
        split(b"x" * 32, holders=[1, 2, 3], threshold=threshold)
    assert error.value.field == "threshold"


def test_split_errors_are_value_errors_naming_the_field_in_the_message():
    with pytest.raises(ValueError, match=r"^threshold: "):
        split(b"x" * 32, holders=[1, 2, 3], threshold=5)
