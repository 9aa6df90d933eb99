"""AES-256-CTR masks: deterministic, key-dependent, prefix-consistent, uniform; in-place mask folding."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from fedcare.errors import ConfigError
from fedcare.privacy.secagg.masking import KEY_BYTES, apply_masks, expand_mask

BLOCK_WORDS = 1 << 16  # the module walks vectors in blocks of this many words
ODD_LENGTH = 2 * BLOCK_WORDS + 7  # two full blocks and a tail that is not a whole AES block


def _key(tag: int) -> bytes:
    return bytes([tag]) * KEY_BYTES


# -- expand_mask ---------------------------------------------------------------------


def test_mask_of_the_zero_key_starts_with_aes256_of_the_zero_block():
    # FIPS-197 style known answer: AES-256 under the all-zero key maps the all-zero block
    # (counter 0) to dc95c078a2408989ad48a21492842087.
    mask = expand_mask(bytes(32), 4)
    assert mask.astype("<u4").tobytes().hex() == "dc95c078a2408989ad48a21492842087"


def test_mask_is_aes256_of_successive_big_endian_counters_read_as_little_endian_words():
    key = bytes(range(32))
    blocks = 9
    counters = b"".join(i.to_bytes(16, "big") for i in range(blocks))
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    expected = np.frombuffer(ecb.update(counters) + ecb.finalize(), dtype="<u4")
    assert np.array_equal(expand_mask(key, 4 * blocks), expected)


def test_expand_mask_is_deterministic():
    assert np.array_equal(expand_mask(_key(1), ODD_LENGTH), expand_mask(_key(1), ODD_LENGTH))


def test_different_keys_give_different_masks():
    first = expand_mask(_key(1), 10_000)
    second = expand_mask(_key(2), 10_000)
    one_bit = expand_mask(bytes(31) + b"\x01", 10_000)
    zero = expand_mask(bytes(32), 10_000)
    # Unrelated 32-bit words agree with probability 2**-32: a handful of matches at most.
    assert np.count_nonzero(first == second) < 5
    assert np.count_nonzero(one_bit == zero) < 5


@pytest.mark.parametrize("length", [1, 3, 4, 5, 1000, BLOCK_WORDS - 1, BLOCK_WORDS, BLOCK_WORDS + 3])
def test_shorter_mask_is_a_prefix_of_a_longer_one(length):
    long = expand_mask(_key(3), ODD_LENGTH)
    assert np.array_equal(expand_mask(_key(3), length), long[:length])


def test_expand_mask_returns_uint32_of_the_requested_length():
    mask = expand_mask(_key(4), ODD_LENGTH)
    assert mask.dtype == np.uint32 and mask.shape == (ODD_LENGTH,)
    assert expand_mask(_key(4), 0).shape == (0,)


def test_mask_bytes_are_uniform():
    words = 1_000_000
    raw = expand_mask(_key(5), words).astype("<u4").view(np.uint8)
    counts = np.bincount(raw, minlength=256)
    assert counts.sum() == 4 * words
    _, p_value = stats.chisquare(counts)
    assert p_value > 0.001


def test_mask_words_have_balanced_bits():
    mask = expand_mask(_key(6), 1_000_000)
    bits = np.unpackbits(mask.view(np.uint8)).reshape(-1, 32)
    ones = bits.sum(axis=0, dtype=np.int64)  # each bit position: binomial(1e6, 1/2), standard deviation 500
    assert np.all(np.abs(ones - 500_000) < 6 * 500)


@pytest.mark.parametrize("length", [31, 16, 33, 0])
def test_expand_mask_refuses_a_key_that_is_not_32_bytes(length):
    with pytest.raises(ConfigError, match=f"got {length}") as error:
        expand_mask(b"k" * length, 10)
    assert error.value.field == "key"


def test_expand_mask_refuses_negative_length():
    with pytest.raises(ConfigError) as error:
        expand_mask(_key(1), -1)
    assert error.value.field == "length"


# -- apply_masks ---------------------------------------------------------------------


def test_adding_then_subtracting_the_same_masks_is_the_identity():
    original = np.random.default_rng(0).integers(0, 2**32, size=ODD_LENGTH, dtype=np.uint32)
    values = original.copy()
    keys = [_key(i) for i in range(1, 6)]
    apply_masks(values, add=keys)
    assert np.count_nonzero(values == original) < 5
    apply_masks(values, subtract=list(reversed(keys)))
    assert np.array_equal(values, original)


def test_adding_and_subtracting_one_key_in_one_call_cancels():
    original = np.arange(ODD_LENGTH, dtype=np.uint32)
    values = original.copy()
    apply_masks(values, add=[_key(1), _key(2)], subtract=[_key(1)])
    expected = original + expand_mask(_key(2), ODD_LENGTH)
    assert np.array_equal(values, expected)


@pytest.mark.parametrize("length", [1, 7, BLOCK_WORDS, ODD_LENGTH])
def test_apply_masks_equals_the_modular_sum_of_expanded_masks(length):
    rng = np.random.default_rng(1)
    start = rng.integers(0, 2**32, size=length, dtype=np.uint32)
    add = [_key(1), _key(2), _key(3)]
    subtract = [_key(4), _key(5)]
    expected = start.astype(np.int64)
    for key in add:
        expected += expand_mask(key, length)
    for key in subtract:
        expected -= expand_mask(key, length)
    expected %= 2**32  # written out in int64: no reliance on uint32 wrapping
    values = start.copy()
    apply_masks(values, add=add, subtract=subtract)
    assert np.array_equal(values, expected.astype(np.uint32))


def test_apply_masks_with_no_keys_leaves_the_vector_unchanged():
    values = np.arange(10, dtype=np.uint32)
    apply_masks(values)
    assert values.tolist() == list(range(10))


def test_apply_masks_on_an_empty_vector_does_nothing():
    values = np.zeros(0, dtype=np.uint32)
    apply_masks(values, add=[_key(1)])
    assert values.shape == (0,)


@pytest.mark.parametrize(
    "values",
    [
        np.zeros(8, dtype=np.int32),
        np.zeros(8, dtype=np.uint64),
        np.zeros(8, dtype=np.float32),
        np.zeros((2, 4), dtype=np.uint32),
        np.zeros(16, dtype=np.uint32)[::2],
    ],
    ids=["int32", "uint64", "float32", "2-D", "strided"],
)
def test_apply_masks_refuses_anything_but_a_contiguous_uint32_vector(values):
    before = values.copy()
    with pytest.raises(ConfigError) as error:
        apply_masks(values, add=[_key(1)])
    assert error.value.field == "out"
    assert np.array_equal(values, before)


@pytest.mark.parametrize(("add", "subtract"), [([b"k" * 31], []), ([], [b"k" * 33]), ([_key(1)], [b""])])
def test_apply_masks_refuses_a_key_that_is_not_32_bytes(add, subtract):
    values = np.arange(8, dtype=np.uint32)
    with pytest.raises(ConfigError) as error:
        apply_masks(values, add=add, subtract=subtract)
    assert error.value.field == "key"
    assert values.tolist() == list(range(8))  # refused before any key touched the vector
