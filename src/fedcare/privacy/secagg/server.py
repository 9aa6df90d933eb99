"""The server's side of a SecAgg+ round: :class:`SecAggServer`."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcare.errors import ProtocolError, SecAggAborted
from fedcare.privacy.secagg.config import resolve_params  # noqa: F401 - used by the doctests
from fedcare.privacy.secagg.context import RoundContext, Step, check_index
from fedcare.privacy.secagg.crypto import (
    BOX_CHARS,
    SIGNATURE_BYTES,
    PeerKeys,
    decode,
    pairwise_mask_key,
    parse_advertisement,
    self_mask_key,
    survivors_message,
    verify,
)
from fedcare.privacy.secagg.masking import apply_masks
from fedcare.privacy.secagg.quantize import dequantize_sum  # noqa: F401 - used by the doctests
from fedcare.privacy.secagg.shamir import SHARE_BYTES, Share, reconstruct

__all__ = ["SecAggServer"]


class SecAggServer:
    """The server's side of a round: routes messages, keeps one running sum, removes the masks.

    Each ``receive_*`` method checks its whole argument before changing any
    state, so after a :class:`~fedcare.errors.ProtocolError` naming a node the
    caller may leave that node out and call again. A
    :class:`~fedcare.errors.SecAggAborted` ends the round: the running sum is
    discarded and every later call raises it again.

    Parameters
    ----------
    context : RoundContext

    Examples
    --------
    >>> from fedcare.privacy.secagg.client import SecAggClient
    >>> context = RoundContext(session=bytes(32), params=resolve_params(num_nodes=3, vector_length=4),
    ...                        clip=1.0, scale=4.0)
    >>> clients = {i: SecAggClient(i, context) for i in (1, 2, 3)}
    >>> server = SecAggServer(context)
    >>> rosters = server.receive_keys({i: c.advertise_keys() for i, c in clients.items()})
    >>> boxes = server.receive_shares({i: c.share_keys(rosters[i]) for i, c in clients.items()})
    >>> for i, c in clients.items():
    ...     server.add_masked_input(i, c.masked_input(np.full(4, 0.25 * i), boxes[i]).values)
    >>> u3 = server.survivors()
    >>> signatures = server.receive_signatures({i: c.consistency_check(u3) for i, c in clients.items()})
    >>> total = server.finish({i: c.unmask(u3, signatures) for i, c in clients.items()})
    >>> dequantize_sum(total, scale=4.0).tolist()
    [1.5, 1.5, 1.5, 1.5]
    """

    def __init__(self, context: RoundContext) -> None:
        self.context = context
        self._step = Step.START
        self._peers: dict[int, PeerKeys] = {}
        self._sets: dict[str, frozenset[int]] = {}
        self._sizes: dict[str, int] = {}
        self._sum: np.ndarray | None = None
        self._received: set[int] = set()
        self._aborted = ""

    def _enter(self, step: Step, name: str) -> None:
        if self._aborted:
            raise SecAggAborted(f"the round was aborted earlier ({self._aborted}); start a new round")
        if self._step != step - 1:
            raise ProtocolError(
                f"{name} called out of order; the server's steps run once each, in order: receive_keys, "
                "receive_shares, add_masked_input, survivors, receive_signatures, finish",
                field="phase",
            )

    def _abort(self, message: str) -> SecAggAborted:
        self._aborted, self._sum = message, None
        return SecAggAborted(f"{message}; the round is aborted and no sum is released")

    def _quorum(self, name: str, members: frozenset[int], phase: str) -> None:
        threshold = self.context.params.threshold
        self._sizes[name] = len(members)
        if len(members) < threshold:
            raise self._abort(
                f"only {len(members)} of {self.context.params.num_nodes} nodes {phase}; the threshold is {threshold}"
            )
        self._sets[name] = members

    def phase_sizes(self) -> dict[str, int]:
        """How many nodes answered each phase so far: ``u1`` .. ``u5`` (0 for phases not reached).

        Counts only, safe for metrics; after an abort the phase that fell short
        shows how many did answer.

        Examples
        --------
        >>> context = RoundContext(session=bytes(32), params=resolve_params(num_nodes=3, vector_length=4),
        ...                        clip=1.0, scale=4.0)
        >>> SecAggServer(context).phase_sizes()
        {'u1': 0, 'u2': 0, 'u3': 0, 'u4': 0, 'u5': 0}
        """
        return {name: self._sizes.get(name, 0) for name in ("u1", "u2", "u3", "u4", "u5")}

    def receive_keys(self, advertisements: Mapping[int, Mapping[str, str]]) -> dict[int, dict[int, dict[str, str]]]:
        """Check the advertisements (U1); return each node's roster.

        Returns
        -------
        dict
            For each ``i`` in U1, ``{j: advertisement of j}`` for ``j`` in its
            neighbours within U1 and ``i`` itself.

        Raises
        ------
        ProtocolError
            Naming the node, if an advertisement is malformed or badly signed.
        SecAggAborted
            If fewer than ``threshold`` nodes advertised.
        """
        self._enter(Step.KEYS, "receive_keys")
        context = self.context
        peers = {
            check_index(i, context=context, field="advertisements"): parse_advertisement(
                advert, session=context.session, index=i
            )
            for i, advert in advertisements.items()
        }
        self._quorum("u1", frozenset(peers), "advertised keys")
        self._peers, self._step = peers, Step.KEYS
        u1 = self._sets["u1"]
        return {
            i: {j: dict(advertisements[j]) for j in sorted((context.neighbours(i) & u1) | {i})} for i in sorted(u1)
        }

    def receive_shares(self, shares: Mapping[int, Mapping[int, str]]) -> dict[int, dict[int, str]]:
        """Check who addressed boxes to whom (U2); route each box to its recipient.

        Parameters
        ----------
        shares : mapping of int to mapping of int to str
            Sender to ``{recipient: box}``.

        Returns
        -------
        dict of int to dict of int to str
            For each recipient in U2, ``{sender: box}`` from the senders in U2.

        Raises
        ------
        ProtocolError
            Naming the sender, if it is not in U1, does not address exactly its
            neighbours in U1, or sends a box of the wrong size.
        SecAggAborted
            If fewer than ``threshold`` nodes shared keys.
        """
        self._enter(Step.SHARES, "receive_shares")
        context = self.context
        u1 = self._sets["u1"]
        for sender, boxes in shares.items():
            check_index(sender, context=context, field="shares")
            if sender not in u1:
                raise ProtocolError("sent shares without advertising keys", node_id=str(sender), field="shares")
            expected = (context.neighbours(sender) & u1) - {sender}
            if set(boxes) != expected:
                raise ProtocolError(
                    f"must address exactly its {len(expected)} neighbours that advertised keys; "
                    f"{len(set(boxes) - expected)} recipients are not among them and {len(expected - set(boxes))} "
                    "are missing",
                    node_id=str(sender),
                    field="shares",
                )
            if any(not isinstance(box, str) or len(box) != BOX_CHARS for box in boxes.values()):
                raise ProtocolError(
                    f"every box must be {BOX_CHARS} base64 characters", node_id=str(sender), field="shares"
                )
        self._quorum("u2", frozenset(shares), "shared keys")
        u2 = self._sets["u2"]
        self._sum = np.zeros(context.params.vector_length, dtype=np.uint32)
        self._step = Step.SHARES
        return {r: {s: shares[s][r] for s in sorted(u2) if r in shares[s]} for r in sorted(u2)}

    def add_masked_input(self, index: int, values: np.ndarray) -> None:
        """Fold one node's masked input into the running sum, modulo ``2**32``, in place.

        In a 16-bit ring the words are below ``2**16``; the sum is still kept
        modulo ``2**32``, whose low 16 bits are the sum modulo ``2**16``.

        Raises
        ------
        ProtocolError
            If the node is not in U2, already sent its input, or ``values`` is
            not a ``uint32`` vector of length ``vector_length`` (with every word
            below ``2**16`` in a 16-bit ring); nothing is added.
        """
        if self._step >= Step.INPUTS and not self._aborted:
            raise ProtocolError(
                "masked input arrived after the survivor set was closed; refused", node_id=str(index), field="values"
            )
        self._enter(Step.INPUTS, "add_masked_input")
        params = self.context.params
        check_index(index, context=self.context, field="index")
        if index not in self._sets["u2"] or index in self._received:
            why = "already sent its input" if index in self._received else "did not share keys"
            raise ProtocolError(f"masked input refused: the node {why}", node_id=str(index), field="values")
        if not isinstance(values, np.ndarray) or values.dtype != np.uint32 or values.shape != (params.vector_length,):
            got = f"{values.dtype} {values.shape}" if isinstance(values, np.ndarray) else type(values).__name__
            raise ProtocolError(
                f"must be a uint32 vector of length {params.vector_length}, got {got}",
                node_id=str(index),
                field="values",
            )
        if self.context.ring_bits < 32 and values.size and int(values.max()) > self.context.ring_mask:
            raise ProtocolError(
                f"must be words of the {self.context.ring_bits}-bit ring (below 2**{self.context.ring_bits}), "
                f"got one of {int(values.max())}",
                node_id=str(index),
                field="values",
            )
        assert self._sum is not None
        np.add(self._sum, values, out=self._sum)
        self._received.add(index)

    def survivors(self) -> list[int]:
        """Close the inputs: U3, the nodes whose masked input arrived, sorted.

        Raises
        ------
        SecAggAborted
            If fewer than ``threshold`` inputs arrived.
        """
        if self._step < Step.INPUTS:
            self._enter(Step.INPUTS, "survivors")
            self._quorum("u3", frozenset(self._received), "sent a masked input")
            self._step = Step.INPUTS
        elif self._aborted:
            self._enter(Step.INPUTS, "survivors")
        return sorted(self._sets["u3"])

    def receive_signatures(self, signatures: Mapping[int, str]) -> dict[int, str]:
        """Check the survivors' signatures over U3 (U4); return them, to send to every node of U4.

        Raises
        ------
        ProtocolError
            Naming the node, if a signer is not in U3 or its signature does not verify.
        SecAggAborted
            If fewer than ``threshold`` nodes signed.
        """
        self._enter(Step.SIGNATURES, "receive_signatures")
        u3 = self._sets["u3"]
        message = survivors_message(self.context.session, tuple(sorted(u3)))
        for j, signature in signatures.items():
            check_index(j, context=self.context, field="signatures")
            raw = decode(signature, length=SIGNATURE_BYTES, field="signatures", node=j)
            if j not in u3 or not verify(self._peers[j].signing_public, raw, message):
                raise ProtocolError("not a valid signature of a survivor over U3", node_id=str(j), field="signatures")
        self._quorum("u4", frozenset(signatures), "signed the survivor set")
        self._step = Step.SIGNATURES
        return dict(sorted(signatures.items()))

    def finish(self, reveals: Mapping[int, Mapping[int, str]]) -> np.ndarray:
        """Rebuild the secrets from the revealed shares, remove the masks, return the sum.

        Parameters
        ----------
        reveals : mapping of int to mapping of int to str
            Sender (U5) to ``{owner: share}``.

        Returns
        -------
        numpy.ndarray
            ``uint32``: the sum of U3's quantized inputs modulo ``2**ring_bits``;
            read it with :func:`~fedcare.privacy.secagg.quantize.dequantize_sum`
            (passing the round's ``ring_bits``).

        Raises
        ------
        ProtocolError
            Naming the sender, if it is not in U4, reveals for a node outside its
            neighbourhood within U2, or sends a malformed share.
        SecAggAborted
            If some node's secret has fewer than ``threshold`` shares, or the
            shares are inconsistent. The running sum is discarded.
        """
        self._enter(Step.DONE, "finish")
        context, threshold = self.context, self.context.params.threshold
        u2, u3, u4 = self._sets["u2"], self._sets["u3"], self._sets["u4"]
        shares: dict[int, list[Share]] = {owner: [] for owner in u2}
        for sender, revealed in reveals.items():
            check_index(sender, context=context, field="reveals")
            if sender not in u4:
                raise ProtocolError(
                    "revealed shares without signing the survivor set", node_id=str(sender), field="reveals"
                )
            allowed = (context.neighbours(sender) | {sender}) & u2
            if not set(revealed) <= allowed:
                raise ProtocolError(
                    "revealed shares of nodes outside its neighbourhood", node_id=str(sender), field="reveals"
                )
            for owner, text in revealed.items():
                shares[owner].append(Share(x=sender, y=decode(text, length=SHARE_BYTES, field="reveals", node=sender)))
        self._sets["u5"], self._sizes["u5"] = frozenset(reveals), len(reveals)
        short = {owner: threshold - len(got) for owner, got in shares.items() if len(got) < threshold}
        if short:
            raise self._abort(
                f"{sum(short.values())} shares are missing for {len(short)} of {len(u2)} nodes' secrets "
                f"(each needs {threshold}): {len(set(short) & u3)} survivors' self masks and "
                f"{len(set(short) - u3)} dropped nodes' pairwise masks cannot be removed"
            )
        add: list[bytes] = []
        subtract: list[bytes] = []
        try:
            for owner in sorted(u3):
                seed = reconstruct(shares[owner])
                subtract.append(self_mask_key(seed, session=context.session, index=owner))
            for dropped in sorted(u2 - u3):
                private = X25519PrivateKey.from_private_bytes(reconstruct(shares[dropped]))
                if private.public_key().public_bytes_raw() != self._peers[dropped].mask_public:
                    raise ProtocolError("the rebuilt key does not match the advertised one", node_id=str(dropped))
                for j in sorted(context.neighbours(dropped) & u3):
                    public = self._peers[j].mask_public
                    key = pairwise_mask_key(private, public, session=context.session, pair=(dropped, j))
                    (subtract if j < dropped else add).append(key)  # undo what survivor j did
        except ProtocolError as error:
            raise self._abort("the revealed shares are inconsistent, so a secret cannot be rebuilt") from error
        total, self._sum = self._sum, None
        assert total is not None
        apply_masks(total, add=add, subtract=subtract)
        if context.ring_bits < 32:
            np.bitwise_and(total, np.uint32(context.ring_mask), out=total)
        self._step = Step.DONE
        return total

