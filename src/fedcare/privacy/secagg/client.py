"""A node's side of a SecAgg+ round: :class:`SecAggClient`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcare.errors import ProtocolError
from fedcare.privacy.secagg.config import resolve_params  # noqa: F401 - used by the doctests
from fedcare.privacy.secagg.context import MaskedInput, RoundContext, Step, check_index, index_set
from fedcare.privacy.secagg.crypto import (
    PUBLIC_BYTES,
    SIGNATURE_BYTES,
    NodeKeys,
    PeerKeys,
    decode,
    encode,
    open_box,
    pairwise_mask_key,
    parse_advertisement,
    seal_box,
    self_mask_key,
    share_box_key,
    survivors_message,
    verify,
)
from fedcare.privacy.secagg.masking import apply_masks
from fedcare.privacy.secagg.quantize import quantize
from fedcare.privacy.secagg.shamir import SECRET_BYTES, SHARE_BYTES, split

__all__ = ["SecAggClient"]


class SecAggClient:
    """One node's side of a round; call its five methods in order, once each.

    Parameters
    ----------
    index : int
        This node's index, ``1 .. num_nodes``.
    context : RoundContext

    Raises
    ------
    ConfigError
        If ``index`` is out of range.

    Examples
    --------
    >>> context = RoundContext(session=bytes(32), params=resolve_params(num_nodes=3, vector_length=4),
    ...                        clip=1.0, scale=4.0)
    >>> sorted(SecAggClient(1, context).advertise_keys())
    ['cipher_public', 'mask_public', 'signature', 'signing_public']
    """

    def __init__(self, index: int, context: RoundContext) -> None:
        self.index = index
        self.context = context
        self._neighbours = context.neighbours(index)
        self._step = Step.START
        self._keys: NodeKeys | None = None
        self._signing: Ed25519PrivateKey | None = None
        self._advert: dict[str, str] = {}
        self._peers: dict[int, PeerKeys] = {}
        self._seed = b""
        self._held: dict[int, tuple[bytes, bytes]] = {}  # owner -> (seed share, mask-key share)
        self._senders: frozenset[int] = frozenset()  # U2 within the neighbours, and this node
        self._signed: tuple[int, ...] = ()

    def _enter(self, step: Step, name: str) -> None:
        if self._step != step - 1:
            raise ProtocolError(
                f"{name} called out of order; a node's phases run once each, in order: advertise_keys, "
                "share_keys, masked_input, consistency_check, unmask",
                node_id=str(self.index),
                field="phase",
            )

    def _error(self, message: str, *, field: str, about: int | None = None) -> ProtocolError:
        return ProtocolError(message, node_id=str(self.index if about is None else about), field=field)

    def advertise_keys(self) -> dict[str, str]:
        """Make fresh key pairs; return the public keys, signed.

        Returns
        -------
        dict of str to str
            ``cipher_public``, ``mask_public``, ``signing_public`` (32 bytes each)
            and ``signature`` (Ed25519 over the session, the index and both
            X25519 keys), base64.

        Raises
        ------
        ProtocolError
            If called twice.
        """
        self._enter(Step.KEYS, "advertise_keys")
        self._keys = NodeKeys.generate()
        self._signing = self._keys.signing
        self._advert = self._keys.advertisement(session=self.context.session, index=self.index)
        self._step = Step.KEYS
        return dict(self._advert)

    def share_keys(self, roster: Mapping[int, Mapping[str, str]]) -> dict[int, str]:
        """Check the neighbours' keys; Shamir-share the self-mask seed and the mask key among them.

        Parameters
        ----------
        roster : mapping of int to advertisement
            The advertisements of this node's neighbours that advertised; may
            include this node's own.

        Returns
        -------
        dict of int to str
            Recipient index to its AES-GCM box (base64) holding its share of the
            seed and its share of the mask private key. This node keeps its own.

        Raises
        ------
        ProtocolError
            If the roster names a non-neighbour or alters this node's keys, an
            advertisement is malformed or badly signed (naming the node), or
            fewer than ``threshold`` holders (this node and its neighbours) are left.

        Examples
        --------
        >>> context = RoundContext(session=bytes(32), params=resolve_params(num_nodes=3, vector_length=4),
        ...                        clip=1.0, scale=4.0)
        >>> clients = {i: SecAggClient(i, context) for i in (1, 2, 3)}
        >>> roster = {i: c.advertise_keys() for i, c in clients.items()}
        >>> sorted(clients[1].share_keys(roster))
        [2, 3]
        """
        self._enter(Step.SHARES, "share_keys")
        assert self._keys is not None
        context = self.context
        peers: dict[int, PeerKeys] = {}
        for j, advert in roster.items():
            check_index(j, context=context, field="roster")
            if j == self.index:
                if dict(advert) != self._advert:
                    raise self._error("the roster alters this node's own advertisement", field="roster")
            elif j not in self._neighbours:
                raise self._error(f"node {j} is not a neighbour of node {self.index}", field="roster", about=j)
            else:
                peers[j] = parse_advertisement(advert, session=context.session, index=j)
        holders = sorted({self.index, *peers})
        threshold = context.params.threshold
        if len(holders) < threshold:
            raise self._error(
                f"only {len(holders)} holders (this node and its neighbours that advertised keys) for its "
                f"shares; the threshold is {threshold}, so the round cannot go on",
                field="roster",
            )
        seed = os.urandom(SECRET_BYTES)
        seed_shares = split(seed, holders=holders, threshold=threshold)
        key_shares = split(self._keys.mask.private_bytes_raw(), holders=holders, threshold=threshold)
        boxes: dict[int, str] = {}
        for seed_share, key_share in zip(seed_shares, key_shares, strict=True):
            holder = seed_share.x
            if holder == self.index:
                self._held[holder] = (seed_share.y, key_share.y)
                continue
            key = share_box_key(
                self._keys.cipher, peers[holder].cipher_public, session=context.session, pair=(self.index, holder)
            )
            boxes[holder] = seal_box(
                key, seed_share.y + key_share.y, session=context.session, sender=self.index, recipient=holder
            )
        self._peers, self._seed, self._step = peers, seed, Step.SHARES
        return boxes

    def masked_input(self, values: np.ndarray, ciphertexts: Mapping[int, str]) -> MaskedInput:
        """Open the shares addressed to this node; quantize ``values`` and mask them.

        Parameters
        ----------
        values : numpy.ndarray
            1-D float vector of length ``vector_length``; read only.
        ciphertexts : mapping of int to str
            Sender index to the box it addressed to this node; the senders are
            this node's neighbours that shared keys (U2).

        Returns
        -------
        MaskedInput

        Raises
        ------
        ProtocolError
            If ``values`` has the wrong type or shape or holds NaN or infinity, a
            box comes from a node outside the roster or fails authentication
            (naming the sender), or fewer than ``threshold`` nodes, this one
            included, shared keys.

        Examples
        --------
        >>> context = RoundContext(session=bytes(32), params=resolve_params(num_nodes=3, vector_length=4),
        ...                        clip=1.0, scale=4.0)
        >>> clients = {i: SecAggClient(i, context) for i in (1, 2, 3)}
        >>> roster = {i: c.advertise_keys() for i, c in clients.items()}
        >>> boxes = {i: c.share_keys(roster) for i, c in clients.items()}
        >>> masked = clients[1].masked_input(np.array([0.5, 2.0, -3.0, 0.0]), {2: boxes[2][1], 3: boxes[3][1]})
        >>> masked.values.dtype.name, masked.values.size, masked.num_clipped
        ('uint32', 4, 2)
        """
        self._enter(Step.INPUTS, "masked_input")
        assert self._keys is not None
        context = self.context
        if (
            not isinstance(values, np.ndarray)
            or not np.issubdtype(values.dtype, np.floating)
            or values.shape != (context.params.vector_length,)
        ):
            got = f"{values.dtype} {values.shape}" if isinstance(values, np.ndarray) else type(values).__name__
            raise self._error(
                f"must be a 1-D float array of length {context.params.vector_length}, got {got}", field="values"
            )
        opened: dict[int, tuple[bytes, bytes]] = {}
        for sender, box in ciphertexts.items():
            check_index(sender, context=context, field="ciphertexts")
            if sender not in self._peers:
                raise self._error(
                    f"a box from node {sender}, which is not in this node's roster", field="ciphertexts", about=sender
                )
            key = share_box_key(
                self._keys.cipher, self._peers[sender].cipher_public, session=context.session, pair=(self.index, sender)
            )
            plain = open_box(key, box, session=context.session, sender=sender, recipient=self.index)
            opened[sender] = (plain[:SHARE_BYTES], plain[SHARE_BYTES:])
        if len(opened) + 1 < context.params.threshold:
            raise self._error(
                f"only {len(opened) + 1} nodes of this neighbourhood shared keys; the threshold is "
                f"{context.params.threshold}, so the round cannot go on",
                field="ciphertexts",
            )
        rng = np.random.default_rng(int.from_bytes(os.urandom(32), "big"))
        quantized = quantize(values, clip=context.clip, scale=context.scale, rng=rng)
        add = [self_mask_key(self._seed, session=context.session, index=self.index)]
        subtract: list[bytes] = []
        for j in sorted(opened):
            key = pairwise_mask_key(
                self._keys.mask, self._peers[j].mask_public, session=context.session, pair=(self.index, j)
            )
            (add if self.index < j else subtract).append(key)
        apply_masks(quantized.values, add=add, subtract=subtract)
        if context.ring_bits < 32:
            # Keep the ring's bits only: the low bits of a uniform mask are uniform, so they still hide the input.
            np.bitwise_and(quantized.values, np.uint32(context.ring_mask), out=quantized.values)
        self._held.update(opened)
        self._senders = frozenset(opened) | {self.index}
        # The masks are applied: the seed and the X25519 private keys are no longer needed.
        self._seed, self._keys = b"", None
        self._step = Step.INPUTS
        return MaskedInput(values=quantized.values, num_clipped=quantized.num_clipped)

    def consistency_check(self, survivors: Sequence[int]) -> str:
        """Sign the survivor set U3 the server announced.

        Parameters
        ----------
        survivors : sequence of int
            U3, the nodes whose masked input the server received.

        Returns
        -------
        str
            Base64 Ed25519 signature over the session, ``"survivors"`` and sorted U3.

        Raises
        ------
        ProtocolError
            If U3 omits this node, names a neighbour that never shared keys, or
            holds fewer than ``threshold`` of this node's neighbourhood.
        """
        self._enter(Step.SIGNATURES, "consistency_check")
        u3 = index_set(survivors, context=self.context, field="survivors")
        threshold = self.context.params.threshold
        if self.index not in u3:
            raise self._error("the survivor set omits this node, which sent its input", field="survivors")
        strangers = (u3 & self._neighbours) - self._senders
        if strangers:
            raise self._error(
                f"the survivor set names {len(strangers)} neighbours that never shared keys", field="survivors"
            )
        if len(u3 & self._senders) < threshold:
            raise self._error(
                f"only {len(u3 & self._senders)} of this neighbourhood survived; the threshold is {threshold}",
                field="survivors",
            )
        assert self._signing is not None
        self._signed = tuple(sorted(u3))
        self._step = Step.SIGNATURES
        return encode(self._signing.sign(survivors_message(self.context.session, self._signed)))

    def unmask(self, survivors: Sequence[int], signatures: Mapping[int, str]) -> dict[int, str]:
        """Check that ``threshold`` neighbours signed U3; reveal one share per neighbour in U2.

        Parameters
        ----------
        survivors : sequence of int
            U3, the same set this node signed.
        signatures : mapping of int to str
            Signatures over U3 the server collected (U4).

        Returns
        -------
        dict of int to str
            Owner index to this node's share (base64, 66 bytes) of the owner's
            self-mask seed if the owner is in U3, or of its mask private key if it
            dropped after sharing. Never both secrets of one owner.

        Raises
        ------
        ProtocolError
            If U3 differs from the signed set, a signature comes from outside U3
            or does not verify (naming the node), or fewer than ``threshold``
            valid signatures are from this node's neighbourhood. Nothing is
            revealed then.

        Examples
        --------
        >>> context = RoundContext(session=bytes(32), params=resolve_params(num_nodes=3, vector_length=4),
        ...                        clip=1.0, scale=4.0)
        >>> clients = {i: SecAggClient(i, context) for i in (1, 2, 3)}
        >>> roster = {i: c.advertise_keys() for i, c in clients.items()}
        >>> boxes = {i: c.share_keys(roster) for i, c in clients.items()}
        >>> for i, c in clients.items():
        ...     _ = c.masked_input(np.zeros(4), {j: boxes[j][i] for j in boxes if j != i})
        >>> signatures = {i: c.consistency_check([1, 2]) for i, c in clients.items() if i != 3}
        >>> sorted(clients[1].unmask([1, 2], signatures))
        [1, 2, 3]
        """
        self._enter(Step.DONE, "unmask")
        context = self.context
        if tuple(sorted(index_set(survivors, context=context, field="survivors"))) != self._signed:
            raise self._error(
                "the survivor set differs from the one this node signed; nothing revealed", field="survivors"
            )
        message = survivors_message(context.session, self._signed)
        own = decode(self._advert["signing_public"], length=PUBLIC_BYTES, field="signing_public")
        valid = 0
        for j, signature in signatures.items():
            check_index(j, context=context, field="signatures")
            if j not in self._signed:
                raise self._error(f"a signature from node {j}, which is not a survivor", field="signatures", about=j)
            public = own if j == self.index else (self._peers[j].signing_public if j in self._peers else None)
            if public is None:
                continue  # not a neighbour: this node has no key to check it with
            raw = decode(signature, length=SIGNATURE_BYTES, field="signatures", node=j)
            if not verify(public, raw, message):
                raise self._error(
                    f"node {j}'s signature is not over this survivor set; nothing revealed", field="signatures", about=j
                )
            valid += 1
        if valid < context.params.threshold:
            raise self._error(
                f"only {valid} valid signatures on the survivor set from this neighbourhood; the threshold is "
                f"{context.params.threshold}; nothing revealed",
                field="signatures",
            )
        u3 = frozenset(self._signed)
        reveals: dict[int, str] = {}
        for owner in sorted(self._senders):
            seed_share, key_share = self._held.pop(owner)
            if owner in reveals:  # unreachable: one entry per owner, and the shares are dropped once read
                raise self._error("would reveal both secrets of one node", field="unmask", about=owner)
            reveals[owner] = encode(seed_share if owner in u3 else key_share)
        self._held.clear()
        self._step = Step.DONE
        return reveals

