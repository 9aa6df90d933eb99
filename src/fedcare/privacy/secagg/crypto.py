"""The cryptography of a SecAgg+ round: key agreement, key derivation, share boxes, signatures.

Every primitive comes from :mod:`cryptography`, and every secret from the
operating system (key generation, :func:`os.urandom`):

* X25519 for key agreement. A node holds two key pairs: ``cipher`` (its shared
  secret with a neighbour encrypts the Shamir shares it sends that neighbour)
  and ``mask`` (its shared secret with a neighbour expands into their pairwise
  mask). Only the mask private key is ever secret-shared.
* HKDF-SHA256 turns a shared secret or a seed into a 32-byte key. Its ``info``
  binds the protocol version, the purpose, the session and the node indices, so
  a key is never reused across rounds, purposes or pairs.
* AES-256-GCM encrypts the shares one node sends another; the associated data
  binds the session, the sender and the recipient, so the server can neither
  replay a box into another round nor redirect it.
* Ed25519 signs a node's advertised keys and the survivor set it agrees to.

Bytes travel as standard base64 strings (:func:`encode`, :func:`decode`).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcare.errors import ProtocolError

__all__ = [
    "ADVERTISEMENT_FIELDS",
    "BOX_CHARS",
    "PUBLIC_BYTES",
    "SIGNATURE_BYTES",
    "NodeKeys",
    "PeerKeys",
    "decode",
    "derive_key",
    "encode",
    "open_box",
    "pairwise_key",
    "pairwise_mask_key",
    "parse_advertisement",
    "seal_box",
    "self_mask_key",
    "share_box_key",
    "survivors_message",
    "verify",
]

_DOMAIN = b"fedcare/secagg+/v1"
_NONCE_BYTES = 12
_TAG_BYTES = 16
#: Length of an X25519 or Ed25519 public key.
PUBLIC_BYTES = 32
#: Length of an Ed25519 signature.
SIGNATURE_BYTES = 64
#: The advertisement's keys, in the order they are listed.
ADVERTISEMENT_FIELDS = ("cipher_public", "mask_public", "signing_public", "signature")
#: Plaintext of a share box: one 66-byte share of the seed, one of the mask key.
_BOX_PLAINTEXT = 2 * 66
#: Length in base64 characters of every share box (nonce, ciphertext, tag).
BOX_CHARS = 4 * -(-(_NONCE_BYTES + _BOX_PLAINTEXT + _TAG_BYTES) // 3)


def encode(data: bytes) -> str:
    """Standard base64 of ``data``.

    Examples
    --------
    >>> encode(b"\\x00\\xff")
    'AP8='
    """
    return base64.b64encode(data).decode("ascii")


def decode(text: object, *, length: int, field: str, node: int | None = None) -> bytes:
    """Strict base64 decoding of a field that must hold exactly ``length`` bytes.

    Parameters
    ----------
    text : object
        The received value; anything but a base64 ``str`` is refused.
    length : int
        The number of bytes it must decode to.
    field : str
        The field's name, for the error.
    node : int, optional
        The node that sent it, for the error.

    Returns
    -------
    bytes

    Raises
    ------
    ProtocolError
        If ``text`` is not a string of valid base64 for exactly ``length`` bytes.

    Examples
    --------
    >>> decode("AP8=", length=2, field="x")
    b'\\x00\\xff'
    >>> decode("AP8=", length=3, field="x", node=4)
    Traceback (most recent call last):
    ...
    fedcare.errors.ProtocolError: [node '4'] x: must be base64 of 3 bytes, got 4 characters
    """
    node_id = None if node is None else str(node)
    if not isinstance(text, str) or len(text) > 4 * -(-length // 3):
        got = f"{len(text)} characters" if isinstance(text, str) else type(text).__name__
        raise ProtocolError(f"must be base64 of {length} bytes, got {got}", node_id=node_id, field=field)
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        data = b""
    if len(data) != length:
        raise ProtocolError(
            f"must be base64 of {length} bytes, got {len(text)} characters", node_id=node_id, field=field
        )
    return data


def _info(purpose: bytes, session: bytes, indices: tuple[int, ...]) -> bytes:
    return b"|".join(
        [_DOMAIN, purpose, len(session).to_bytes(2, "big") + session, b"".join(i.to_bytes(4, "big") for i in indices)]
    )


def derive_key(secret: bytes, *, session: bytes, purpose: bytes, indices: tuple[int, ...]) -> bytes:
    """A 32-byte key from ``secret`` by HKDF-SHA256, bound to the session, purpose and indices.

    Parameters
    ----------
    secret : bytes
        A shared X25519 secret or a 32-byte seed.
    session : bytes
        The round's session bytes.
    purpose : bytes
        What the key is for, e.g. ``b"self-mask"``.
    indices : tuple of int
        The node indices the key belongs to (pairs in increasing order).

    Returns
    -------
    bytes
        32 bytes.

    Examples
    --------
    >>> a = derive_key(bytes(32), session=b"s" * 32, purpose=b"self-mask", indices=(1,))
    >>> len(a), a == derive_key(bytes(32), session=b"s" * 32, purpose=b"self-mask", indices=(2,))
    (32, False)
    """
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=_info(purpose, session, indices)).derive(secret)


def _exchange(private: X25519PrivateKey, public: bytes, *, node: int) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as error:  # a low-order point gives an all-zero secret
        raise ProtocolError(
            "the advertised X25519 key gives no shared secret (low-order point)", node_id=str(node), field="public_key"
        ) from error


def pairwise_key(
    private: X25519PrivateKey, public: bytes, *, session: bytes, purpose: bytes, pair: tuple[int, int]
) -> bytes:
    """The key two nodes share: HKDF of their X25519 secret, bound to both indices in increasing order.

    Parameters
    ----------
    private : X25519PrivateKey
        One node's private key.
    public : bytes
        The other node's 32-byte public key.
    session, purpose : bytes
        As :func:`derive_key`.
    pair : tuple of int
        The two indices, in either order; ``pair[1]`` is the owner of ``public``.

    Returns
    -------
    bytes
        32 bytes, the same from either side.

    Raises
    ------
    ProtocolError
        If ``public`` is a low-order point.

    Examples
    --------
    >>> a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    >>> pub = lambda k: k.public_key().public_bytes_raw()
    >>> k12 = pairwise_key(a, pub(b), session=b"s" * 32, purpose=b"mask", pair=(1, 2))
    >>> k12 == pairwise_key(b, pub(a), session=b"s" * 32, purpose=b"mask", pair=(2, 1))
    True
    """
    shared = _exchange(private, public, node=pair[1])
    return derive_key(shared, session=session, purpose=purpose, indices=(min(pair), max(pair)))


def share_box_key(private: X25519PrivateKey, public: bytes, *, session: bytes, pair: tuple[int, int]) -> bytes:
    """The AES-256-GCM key of the share boxes between ``pair`` (cipher keys; see :func:`pairwise_key`)."""
    return pairwise_key(private, public, session=session, purpose=b"share-box", pair=pair)


def pairwise_mask_key(private: X25519PrivateKey, public: bytes, *, session: bytes, pair: tuple[int, int]) -> bytes:
    """The key of the pairwise mask between ``pair`` (mask keys; see :func:`pairwise_key`)."""
    return pairwise_key(private, public, session=session, purpose=b"pairwise-mask", pair=pair)


def self_mask_key(seed: bytes, *, session: bytes, index: int) -> bytes:
    """The key of node ``index``'s self mask, derived from its 32-byte seed.

    Examples
    --------
    >>> len(self_mask_key(bytes(32), session=b"s" * 32, index=1))
    32
    """
    return derive_key(seed, session=session, purpose=b"self-mask", indices=(index,))


def _box_data(session: bytes, sender: int, recipient: int) -> bytes:
    return _info(b"share-box", session, (sender, recipient))


def seal_box(key: bytes, plaintext: bytes, *, session: bytes, sender: int, recipient: int) -> str:
    """AES-256-GCM encryption of a share box, base64 of ``nonce || ciphertext || tag``.

    The 12-byte nonce is fresh from the OS; the associated data binds the
    session, the sender and the recipient.

    Examples
    --------
    >>> box = seal_box(b"k" * 32, b"p" * 132, session=b"s" * 32, sender=1, recipient=2)
    >>> len(box) == BOX_CHARS, open_box(b"k" * 32, box, session=b"s" * 32, sender=1, recipient=2) == b"p" * 132
    (True, True)
    """
    nonce = os.urandom(_NONCE_BYTES)
    return encode(nonce + AESGCM(key).encrypt(nonce, plaintext, _box_data(session, sender, recipient)))


def open_box(key: bytes, box: object, *, session: bytes, sender: int, recipient: int) -> bytes:
    """Decrypt and authenticate a box sealed by :func:`seal_box`.

    Raises
    ------
    ProtocolError
        Naming the sender, if the box is malformed or fails authentication
        (tampered with, replayed from another round or meant for another node).

    Examples
    --------
    >>> box = seal_box(b"k" * 32, b"p" * 132, session=b"s" * 32, sender=1, recipient=2)
    >>> open_box(b"k" * 32, box, session=b"s" * 32, sender=1, recipient=3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fedcare.errors.ProtocolError: [node '1'] ciphertexts: the share box from node 1 failed authentication ...
    """
    raw = decode(box, length=_NONCE_BYTES + _BOX_PLAINTEXT + _TAG_BYTES, field="ciphertexts", node=sender)
    try:
        return AESGCM(key).decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _box_data(session, sender, recipient))
    except InvalidTag as error:
        raise ProtocolError(
            f"the share box from node {sender} failed authentication (tampered with, replayed or misaddressed); "
            f"treat node {sender} as dropped",
            node_id=str(sender),
            field="ciphertexts",
        ) from error


def _advertisement_message(session: bytes, index: int, cipher_public: bytes, mask_public: bytes) -> bytes:
    return _info(b"advertise", session, (index,)) + cipher_public + mask_public


def survivors_message(session: bytes, survivors: tuple[int, ...]) -> bytes:
    """The bytes a node signs to agree to the survivor set: session, ``"survivors"``, sorted indices.

    Examples
    --------
    >>> survivors_message(b"s", (1, 3)) == survivors_message(b"s", (1, 2, 3))
    False
    """
    return _info(b"survivors", session, (len(survivors), *sorted(survivors)))


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` under ``public``.

    Examples
    --------
    >>> key = Ed25519PrivateKey.generate()
    >>> verify(key.public_key().public_bytes_raw(), key.sign(b"m"), b"m")
    True
    """
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class PeerKeys:
    """The public keys a node advertised, decoded and checked.

    Attributes
    ----------
    cipher_public, mask_public, signing_public : bytes
        32 bytes each.
    """

    cipher_public: bytes
    mask_public: bytes
    signing_public: bytes


@dataclass(frozen=True)
class NodeKeys:
    """A node's three fresh key pairs for one round; make them with :meth:`generate`.

    Attributes
    ----------
    cipher, mask : X25519PrivateKey
        Key agreement for share boxes and for pairwise masks.
    signing : Ed25519PrivateKey
        Signs the advertisement and the survivor set.

    Examples
    --------
    >>> keys = NodeKeys.generate()
    >>> advert = keys.advertisement(session=b"s" * 32, index=1)
    >>> parse_advertisement(advert, session=b"s" * 32, index=1).mask_public == keys.public().mask_public
    True
    """

    cipher: X25519PrivateKey
    mask: X25519PrivateKey
    signing: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> NodeKeys:
        """Three new key pairs from the operating system's random source."""
        return cls(
            cipher=X25519PrivateKey.generate(), mask=X25519PrivateKey.generate(), signing=Ed25519PrivateKey.generate()
        )

    def public(self) -> PeerKeys:
        """The public halves."""
        return PeerKeys(
            cipher_public=self.cipher.public_key().public_bytes_raw(),
            mask_public=self.mask.public_key().public_bytes_raw(),
            signing_public=self.signing.public_key().public_bytes_raw(),
        )

    def advertisement(self, *, session: bytes, index: int) -> dict[str, str]:
        """The public keys as base64, signed over session, index and both X25519 keys."""
        public = self.public()
        message = _advertisement_message(session, index, public.cipher_public, public.mask_public)
        return {
            "cipher_public": encode(public.cipher_public),
            "mask_public": encode(public.mask_public),
            "signing_public": encode(public.signing_public),
            "signature": encode(self.signing.sign(message)),
        }


def parse_advertisement(advert: Mapping[str, str], *, session: bytes, index: int) -> PeerKeys:
    """Decode node ``index``'s advertisement and check its signature.

    Parameters
    ----------
    advert : mapping of str to str
        Exactly the keys of :data:`ADVERTISEMENT_FIELDS`, base64 values.
    session : bytes
        The round's session bytes.
    index : int
        The node that advertised.

    Returns
    -------
    PeerKeys

    Raises
    ------
    ProtocolError
        Naming the node, if a field is missing, extra or malformed, or the
        signature does not verify (wrong round, wrong index or altered keys).

    Examples
    --------
    >>> advert = NodeKeys.generate().advertisement(session=b"s" * 32, index=1)
    >>> parse_advertisement(advert, session=b"s" * 32, index=2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fedcare.errors.ProtocolError: [node '2'] advertisement.signature: does not verify ...
    """
    if not isinstance(advert, Mapping) or set(advert) != set(ADVERTISEMENT_FIELDS):
        got = sorted(map(str, advert)) if isinstance(advert, Mapping) else type(advert).__name__
        raise ProtocolError(
            f"must have exactly the keys {list(ADVERTISEMENT_FIELDS)}, got {got}",
            node_id=str(index),
            field="advertisement",
        )
    keys = {
        name: decode(advert[name], length=PUBLIC_BYTES, field=f"advertisement.{name}", node=index)
        for name in ADVERTISEMENT_FIELDS[:3]
    }
    signature = decode(advert["signature"], length=SIGNATURE_BYTES, field="advertisement.signature", node=index)
    message = _advertisement_message(session, index, keys["cipher_public"], keys["mask_public"])
    if not verify(keys["signing_public"], signature, message):
        raise ProtocolError(
            f"does not verify for this session and node index; treat node {index} as dropped",
            node_id=str(index),
            field="advertisement.signature",
        )
    return PeerKeys(**keys)
