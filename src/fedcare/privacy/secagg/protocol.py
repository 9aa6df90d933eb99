"""The SecAgg+ protocol engine: the state machines of a node and of the server, without I/O.

One round sums the quantized vectors of the nodes ``1 .. num_nodes`` so that
the server learns the sum and nothing else (Bonawitz et al., 2017; with a
sparse neighbour graph, Bell et al., 2020). Node ``i`` masks its vector with a
pairwise mask per neighbour ``j`` (added if ``i < j``, subtracted if ``i > j``,
so they cancel in the sum) and a self mask from a fresh seed ``b_i``. Both
secrets that unmask a node, ``b_i`` and its mask private key, are
Shamir-shared among its neighbours. Each phase shrinks the set of live nodes:

==================  ==============================================  ===============
phase               node sends                                      set of senders
==================  ==============================================  ===============
advertise_keys      signed X25519 public keys                       U1
share_keys          AES-GCM boxes of its shares, one per neighbour  U2 within U1
masked_input        its masked ``uint32`` vector                    U3 within U2
consistency_check   an Ed25519 signature over U3                    U4 within U3
unmask              per neighbour: seed share if in U3, else key    U5 within U4
==================  ==============================================  ===============

The server removes the self masks of U3 and the pairwise masks between U3 and
the nodes of U2 that dropped before sending an input. A node reveals one
secret per neighbour, never both, and only after ``threshold`` neighbours signed
the same U3, so the server can never unmask a single vector. At every phase at
least ``threshold`` nodes must be left, or :class:`~fedcare.errors.SecAggAborted`
is raised and no sum is released.

Messages are plain dicts of ints and base64 strings, except the masked input, a
``uint32`` array. The server keeps one running sum, O(vector length) memory.

Examples
--------
>>> context = RoundContext(session=bytes(32), params=resolve_params(num_nodes=4, vector_length=3), clip=1.0, scale=4.0)
>>> inputs = {i: np.full(3, 0.25 * i) for i in range(1, 5)}
>>> total, server = run_round(context, inputs, drop_after={"share_keys": [4]})
>>> dequantize_sum(total, scale=4.0).tolist(), server.phase_sizes()
([1.5, 1.5, 1.5], {'u1': 4, 'u2': 4, 'u3': 3, 'u4': 3, 'u5': 3})

In the 16-bit ring (``ring_bits=16``) every masked word, and the total, is below ``2**16``:

>>> narrow = RoundContext(session=bytes(32), params=resolve_params(num_nodes=4, vector_length=3), clip=1.0,
...                       scale=4.0, ring_bits=16)
>>> total, _ = run_round(narrow, inputs, drop_after={"share_keys": [4]})
>>> int(total.max()) < 2**16, dequantize_sum(total, scale=4.0, ring_bits=16).tolist()
(True, [1.5, 1.5, 1.5])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

import numpy as np

from fedcare.errors import ConfigError
from fedcare.privacy.secagg.client import SecAggClient
from fedcare.privacy.secagg.config import resolve_params  # noqa: F401 - used by the doctests
from fedcare.privacy.secagg.context import MaskedInput, RoundContext
from fedcare.privacy.secagg.quantize import dequantize_sum  # noqa: F401 - used by the doctests
from fedcare.privacy.secagg.server import SecAggServer

__all__ = ["PHASES", "MaskedInput", "RoundContext", "SecAggClient", "SecAggServer", "run_round"]

#: The node-side phases, in order; the names :func:`run_round` accepts in ``drop_after``.
PHASES = ("advertise_keys", "share_keys", "masked_input", "consistency_check", "unmask")
_NO_DROPS: Mapping[str, Iterable[int]] = MappingProxyType({})


def run_round(
    context: RoundContext,
    inputs: Mapping[int, np.ndarray],
    *,
    drop_after: Mapping[str, Iterable[int]] = _NO_DROPS,
) -> tuple[np.ndarray, SecAggServer]:
    """Run a whole round in process, for tests and benchmarks.

    Parameters
    ----------
    context : RoundContext
    inputs : mapping of int to numpy.ndarray
        Node index to its float vector; the nodes not listed never advertise.
    drop_after : mapping of str to iterable of int
        Phase name (one of :data:`PHASES`) to the nodes that do that phase and
        then vanish.

    Returns
    -------
    tuple of numpy.ndarray and SecAggServer
        The ``uint32`` sum of the quantized inputs of U3, and the server (for
        :meth:`SecAggServer.phase_sizes`).

    Raises
    ------
    ConfigError
        If ``drop_after`` names an unknown phase.
    SecAggAborted
        If too few nodes are left at some phase.

    Examples
    --------
    >>> context = RoundContext(session=bytes(32), params=resolve_params(num_nodes=5, vector_length=2),
    ...                        clip=1.0, scale=4.0)
    >>> total, _ = run_round(context, {i: np.array([0.5, -0.25]) for i in range(1, 6)})
    >>> dequantize_sum(total, scale=4.0).tolist()
    [2.5, -1.25]
    """
    unknown = sorted(set(drop_after) - set(PHASES))
    if unknown:
        raise ConfigError(f"unknown phases {unknown}; expected some of {list(PHASES)}", field="drop_after")
    drops = {phase: frozenset(drop_after.get(phase, ())) for phase in PHASES}
    clients = {i: SecAggClient(i, context) for i in sorted(inputs)}
    server = SecAggServer(context)
    alive = set(clients)

    rosters = server.receive_keys({i: clients[i].advertise_keys() for i in sorted(alive)})
    alive -= drops["advertise_keys"]
    boxes = server.receive_shares({i: clients[i].share_keys(rosters[i]) for i in sorted(alive)})
    alive -= drops["share_keys"]
    for i in sorted(alive):
        server.add_masked_input(i, clients[i].masked_input(inputs[i], boxes[i]).values)
    alive -= drops["masked_input"]
    u3 = server.survivors()
    signatures = server.receive_signatures({i: clients[i].consistency_check(u3) for i in sorted(alive & set(u3))})
    alive -= drops["consistency_check"]
    reveals = {i: clients[i].unmask(u3, signatures) for i in sorted(alive & set(signatures))}
    return server.finish(reveals), server
