"""The SecAgg+ protocol engine: exact sums under dropouts, aborts below threshold, what nodes refuse to reveal."""

from __future__ import annotations

import base64
import hashlib

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from fedcare.errors import ConfigError, FederationError, ProtocolError, SecAggAborted
from fedcare.privacy.secagg import (
    PHASES,
    RoundContext,
    SecAggClient,
    SecAggServer,
    Share,
    dequantize_sum,
    quantization_error_bound,
    reconstruct,
    resolve_params,
    run_round,
)
from fedcare.privacy.secagg.config import default_threshold

LENGTH = 64
SCALE = 2.0**10  # a power of two: inputs on the 1/SCALE grid quantize exactly
CLIP = 1.0
# Complete graphs for every n, then the default sparse graph for 50 nodes (34 neighbours).
COMPLETE_SIZES = [3, 4, 7, 10, 25, 50]


def _context(num_nodes: int, *, neighbours: int | None = None, vector_length: int = LENGTH) -> RoundContext:
    params = resolve_params(num_nodes=num_nodes, vector_length=vector_length, neighbours=neighbours)
    session = hashlib.sha256(f"test-run/{num_nodes}/{neighbours}/{vector_length}".encode()).digest()
    return RoundContext(session=session, params=params, clip=CLIP, scale=SCALE)


def _grid_inputs(num_nodes: int, *, seed: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Float inputs that are integer multiples of 1/SCALE (so rounding is exact), and those integers."""
    rng = np.random.default_rng(seed)
    steps = int(CLIP * SCALE)
    integers = {i: rng.integers(-steps, steps + 1, size=LENGTH) for i in range(1, num_nodes + 1)}
    return {i: v / SCALE for i, v in integers.items()}, integers


def _expected(integers: dict[int, np.ndarray], nodes: set[int]) -> np.ndarray:
    return np.sum([integers[i] for i in sorted(nodes)], axis=0)


def _drops(num_nodes: int, count: int, *, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(np.arange(1, num_nodes + 1), size=count, replace=False))


def _summed_nodes(num_nodes: int, phase: str | None, dropped: list[int]) -> set[int]:
    """U3: the nodes that sent a masked input."""
    everyone = set(range(1, num_nodes + 1))
    return everyone - set(dropped) if phase in ("advertise_keys", "share_keys") else everyone


def _until_masked(
    context: RoundContext, nodes: list[int]
) -> tuple[dict[int, SecAggClient], SecAggServer, dict[int, dict[int, str]]]:
    clients = {i: SecAggClient(i, context) for i in nodes}
    server = SecAggServer(context)
    rosters = server.receive_keys({i: c.advertise_keys() for i, c in clients.items()})
    boxes = server.receive_shares({i: c.share_keys(rosters[i]) for i, c in clients.items()})
    return clients, server, boxes


def _until_unmask(
    context: RoundContext, inputs: dict[int, np.ndarray], *, senders: list[int] | None = None
) -> tuple[dict[int, SecAggClient], SecAggServer, list[int], dict[int, str]]:
    """Run to the unmask phase; only ``senders`` (default: all) send a masked input."""
    clients, server, boxes = _until_masked(context, sorted(inputs))
    for i in senders if senders is not None else sorted(inputs):
        server.add_masked_input(i, clients[i].masked_input(inputs[i], boxes[i]).values)
    u3 = server.survivors()
    signatures = server.receive_signatures({i: clients[i].consistency_check(u3) for i in u3})
    return clients, server, u3, signatures


# -- correctness ---------------------------------------------------------------------


@pytest.mark.parametrize("phase", [None, *PHASES])
@pytest.mark.parametrize("num_nodes", COMPLETE_SIZES)
def test_secure_sum_equals_sum_of_quantized_inputs_with_dropouts_down_to_threshold(num_nodes, phase):
    context = _context(num_nodes, neighbours=num_nodes - 1)
    threshold = context.params.threshold
    inputs, integers = _grid_inputs(num_nodes, seed=num_nodes)
    dropped = _drops(num_nodes, num_nodes - threshold, seed=7) if phase else []

    total, server = run_round(context, inputs, drop_after={phase: dropped} if phase else {})

    summed = _summed_nodes(num_nodes, phase, dropped)
    assert total.dtype == np.uint32
    assert np.array_equal(total.view(np.int32), _expected(integers, summed))
    assert min(server.phase_sizes().values()) == (threshold if phase and phase != "unmask" else num_nodes)


@pytest.mark.parametrize("phase", PHASES)
def test_secure_sum_is_exact_in_sparse_graph_with_as_many_dropouts_as_a_neighbourhood_tolerates(phase):
    context = _context(50)  # default: 34 neighbours, threshold 24
    assert (context.params.neighbours, context.params.threshold) == (34, 24)
    tolerable = context.params.neighbours + 1 - context.params.threshold
    inputs, integers = _grid_inputs(50, seed=50)
    dropped = _drops(50, tolerable, seed=11)

    total, _ = run_round(context, inputs, drop_after={phase: dropped})

    assert np.array_equal(total.view(np.int32), _expected(integers, _summed_nodes(50, phase, dropped)))


def test_secure_sum_with_dropouts_spread_over_every_phase_is_exact():
    context = _context(10)
    inputs, integers = _grid_inputs(10, seed=3)
    drop_after = {"advertise_keys": [2], "share_keys": [5], "masked_input": [7]}  # t = 7: 7 survive to the end

    total, server = run_round(context, inputs, drop_after=drop_after)

    assert np.array_equal(total.view(np.int32), _expected(integers, set(range(1, 11)) - {2, 5}))
    assert server.phase_sizes() == {"u1": 10, "u2": 9, "u3": 8, "u4": 7, "u5": 7}


def test_dequantized_secure_sum_is_within_quantization_bound_of_float_sum():
    context = _context(10)
    rng = np.random.default_rng(5)
    inputs = {i: rng.uniform(-CLIP, CLIP, size=LENGTH) for i in range(1, 11)}

    total, _ = run_round(context, inputs, drop_after={"share_keys": [4, 9]})

    survivors = [i for i in inputs if i not in (4, 9)]
    error = np.abs(dequantize_sum(total, scale=SCALE) - np.sum([inputs[i] for i in survivors], axis=0))
    assert error.max() <= quantization_error_bound(scale=SCALE, num_summed=len(survivors))


def test_inputs_outside_clip_range_are_clipped_and_counted():
    context = _context(3)
    clients, _, boxes = _until_masked(context, [1, 2, 3])
    values = np.zeros(LENGTH)
    values[:5] = [3.0, -2.0, 1.5, CLIP, -CLIP]  # three outside, two on the bound

    masked = clients[1].masked_input(values, boxes[1])

    assert masked.num_clipped == 3


def test_clipped_inputs_enter_the_sum_at_the_clip_bound():
    context = _context(3)
    inputs = {i: np.full(LENGTH, 5.0 * (-1) ** i) for i in (1, 2, 3)}  # -5, +5, -5

    total, _ = run_round(context, inputs)

    assert np.array_equal(total.view(np.int32), np.full(LENGTH, -int(CLIP * SCALE)))


def test_phase_sizes_count_the_nodes_of_each_phase():
    context = _context(7)
    inputs, _ = _grid_inputs(7, seed=1)

    _, server = run_round(context, inputs, drop_after={"masked_input": [3], "consistency_check": [6]})

    assert server.phase_sizes() == {"u1": 7, "u2": 7, "u3": 7, "u4": 6, "u5": 5}


# -- aborts below threshold ------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "message"),
    [
        ("advertise_keys", r"only 4 of 7 nodes shared keys; the threshold is 5"),
        ("share_keys", r"only 4 of 7 nodes sent a masked input; the threshold is 5"),
        ("masked_input", r"only 4 of 7 nodes signed the survivor set; the threshold is 5"),
        ("consistency_check", r"shares are missing for 7 of 7 nodes' secrets"),
    ],
)
def test_round_aborts_with_no_sum_when_fewer_than_threshold_nodes_are_left(phase, message):
    context = _context(7)  # threshold 5
    inputs, _ = _grid_inputs(7, seed=2)

    with pytest.raises(SecAggAborted, match=message):
        run_round(context, inputs, drop_after={phase: [1, 4, 6]})


def test_round_aborts_when_fewer_than_threshold_nodes_advertise_keys():
    context = _context(7)
    inputs, _ = _grid_inputs(7, seed=2)

    with pytest.raises(SecAggAborted, match=r"only 4 of 7 nodes advertised keys; the threshold is 5"):
        run_round(context, {i: inputs[i] for i in (1, 2, 3, 4)})


def test_aborted_server_refuses_every_later_call_and_never_releases_a_sum():
    context = _context(7)
    inputs, _ = _grid_inputs(7, seed=4)
    clients, server, u3, signatures = _until_unmask(context, inputs)
    reveals = {i: clients[i].unmask(u3, signatures) for i in u3}

    with pytest.raises(SecAggAborted, match="no sum is released"):
        server.finish({i: reveals[i] for i in (1, 2, 3, 4)})
    with pytest.raises(SecAggAborted, match="aborted earlier"):
        server.finish(reveals)
    with pytest.raises(SecAggAborted):
        server.survivors()


def test_secagg_aborted_is_a_federation_error():
    assert issubclass(SecAggAborted, FederationError)


def test_client_refuses_to_share_keys_with_fewer_than_threshold_holders():
    context = _context(7)
    clients = {i: SecAggClient(i, context) for i in range(1, 8)}
    adverts = {i: c.advertise_keys() for i, c in clients.items()}

    with pytest.raises(ProtocolError, match="only 4 holders"):
        clients[1].share_keys({i: adverts[i] for i in (1, 2, 3, 4)})


# -- what a node reveals ---------------------------------------------------------------


def test_node_reveals_seed_share_of_survivors_and_key_share_of_dropped_nodes_never_both():
    context = _context(7)
    inputs, _ = _grid_inputs(7, seed=6)
    clients, server, boxes = _until_masked(context, list(range(1, 8)))
    adverts = {i: c._advert for i, c in clients.items()}
    for i in (1, 2, 3, 4, 5, 6):  # node 7 shared its secrets, then dropped
        server.add_masked_input(i, clients[i].masked_input(inputs[i], boxes[i]).values)
    u3 = server.survivors()
    signatures = server.receive_signatures({i: clients[i].consistency_check(u3) for i in u3})

    reveals = {i: clients[i].unmask(u3, signatures) for i in u3}

    assert all(sorted(revealed) == list(range(1, 8)) for revealed in reveals.values())  # one share per owner
    threshold = context.params.threshold
    key_shares = [Share(x=i, y=base64.b64decode(reveals[i][7])) for i in u3[:threshold]]
    rebuilt = X25519PrivateKey.from_private_bytes(reconstruct(key_shares)).public_key().public_bytes_raw()
    assert base64.b64encode(rebuilt).decode() == adverts[7]["mask_public"]
    seed_shares = [Share(x=i, y=base64.b64decode(reveals[i][1])) for i in u3[:threshold]]
    not_a_key = X25519PrivateKey.from_private_bytes(reconstruct(seed_shares)).public_key().public_bytes_raw()
    assert base64.b64encode(not_a_key).decode() != adverts[1]["mask_public"]


def test_node_refuses_to_unmask_twice():
    context = _context(4)
    inputs, _ = _grid_inputs(4, seed=8)
    clients, _, u3, signatures = _until_unmask(context, inputs)
    clients[1].unmask(u3, signatures)

    with pytest.raises(ProtocolError, match="out of order"):
        clients[1].unmask(u3, signatures)


def test_node_refuses_to_sign_a_second_survivor_set():
    context = _context(4)
    inputs, _ = _grid_inputs(4, seed=8)
    clients, server, boxes = _until_masked(context, [1, 2, 3, 4])
    for i in (1, 2, 3, 4):
        server.add_masked_input(i, clients[i].masked_input(inputs[i], boxes[i]).values)
    clients[1].consistency_check([1, 2, 3, 4])

    with pytest.raises(ProtocolError, match="out of order"):
        clients[1].consistency_check([1, 2, 3])


def test_node_refuses_to_unmask_with_fewer_than_threshold_signatures():
    context = _context(7)  # threshold 5
    inputs, _ = _grid_inputs(7, seed=9)
    clients, _, u3, signatures = _until_unmask(context, inputs)

    with pytest.raises(ProtocolError, match="only 4 valid signatures"):
        clients[1].unmask(u3, {i: signatures[i] for i in (1, 2, 3, 4)})


def test_node_refuses_to_unmask_when_neighbours_signed_a_different_survivor_set():
    context = _context(5)
    inputs, _ = _grid_inputs(5, seed=10)
    clients, server, boxes = _until_masked(context, [1, 2, 3, 4, 5])
    for i in range(1, 6):
        server.add_masked_input(i, clients[i].masked_input(inputs[i], boxes[i]).values)
    # A lying server tells nodes 1-4 that node 5 dropped, and node 5 that everyone survived.
    signatures = {i: clients[i].consistency_check([1, 2, 3, 4]) for i in (1, 2, 3, 4)}
    signatures[5] = clients[5].consistency_check([1, 2, 3, 4, 5])

    with pytest.raises(ProtocolError, match="not over this survivor set") as caught:
        clients[5].unmask([1, 2, 3, 4, 5], signatures)
    assert caught.value.node_id == "1"


def test_node_refuses_to_unmask_a_survivor_set_it_did_not_sign():
    context = _context(5)
    inputs, _ = _grid_inputs(5, seed=12)
    clients, _, u3, signatures = _until_unmask(context, inputs)

    with pytest.raises(ProtocolError, match="differs from the one this node signed"):
        clients[1].unmask(u3[:-1], signatures)


def test_tampered_share_box_raises_protocol_error_naming_the_sender():
    context = _context(4)
    clients, _, boxes = _until_masked(context, [1, 2, 3, 4])
    raw = bytearray(base64.b64decode(boxes[1][3]))
    raw[20] ^= 1
    tampered = {**boxes[1], 3: base64.b64encode(bytes(raw)).decode()}

    with pytest.raises(ProtocolError, match="from node 3 failed authentication") as caught:
        clients[1].masked_input(np.zeros(LENGTH), tampered)
    assert caught.value.node_id == "3"


def test_share_box_redirected_to_another_node_fails_authentication():
    context = _context(4)
    clients, _, boxes = _until_masked(context, [1, 2, 3, 4])
    redirected = {**boxes[1], 3: boxes[2][3]}  # node 3's box for node 2, handed to node 1

    with pytest.raises(ProtocolError, match="from node 3 failed authentication"):
        clients[1].masked_input(np.zeros(LENGTH), redirected)


def test_client_rejects_an_advertisement_with_altered_keys():
    context = _context(4)
    clients = {i: SecAggClient(i, context) for i in range(1, 5)}
    adverts = {i: c.advertise_keys() for i, c in clients.items()}
    adverts[2] = {**adverts[2], "mask_public": adverts[3]["mask_public"]}

    with pytest.raises(ProtocolError, match="does not verify") as caught:
        clients[1].share_keys(adverts)
    assert caught.value.node_id == "2"


# -- what the server accepts -----------------------------------------------------------


def test_server_rejects_a_sender_addressing_a_non_neighbour():
    context = _context(10, neighbours=4)
    clients, server = {i: SecAggClient(i, context) for i in range(1, 11)}, SecAggServer(context)
    rosters = server.receive_keys({i: c.advertise_keys() for i, c in clients.items()})
    shares = {i: c.share_keys(rosters[i]) for i, c in clients.items()}
    stranger = min(set(range(2, 11)) - context.neighbours(1))
    shares[1] = {**shares[1], stranger: next(iter(shares[1].values()))}

    with pytest.raises(ProtocolError, match="not among them") as caught:
        server.receive_shares(shares)
    assert caught.value.node_id == "1"


def test_server_refuses_a_second_masked_input_from_the_same_node():
    context = _context(3)
    clients, server, boxes = _until_masked(context, [1, 2, 3])
    masked = clients[1].masked_input(np.zeros(LENGTH), boxes[1]).values
    server.add_masked_input(1, masked)

    with pytest.raises(ProtocolError, match="already sent its input"):
        server.add_masked_input(1, masked)


def test_server_refuses_a_masked_input_of_the_wrong_dtype():
    context = _context(3)
    _, server, _ = _until_masked(context, [1, 2, 3])

    with pytest.raises(ProtocolError, match="must be a uint32 vector of length 64"):
        server.add_masked_input(1, np.zeros(LENGTH, dtype=np.int64))


def test_server_refuses_a_masked_input_after_the_survivor_set_is_closed():
    context = _context(4)
    inputs, _ = _grid_inputs(4, seed=13)
    clients, server, boxes = _until_masked(context, [1, 2, 3, 4])
    for i in (1, 2, 3):
        server.add_masked_input(i, clients[i].masked_input(inputs[i], boxes[i]).values)
    server.survivors()

    with pytest.raises(ProtocolError, match="after the survivor set was closed"):
        server.add_masked_input(4, clients[4].masked_input(inputs[4], boxes[4]).values)


def test_run_round_rejects_an_unknown_phase_name():
    with pytest.raises(ConfigError, match="drop_after"):
        run_round(_context(3), {}, drop_after={"masking": [1]})


def test_context_refuses_a_scale_at_which_the_sum_could_wrap():
    params = resolve_params(num_nodes=100, vector_length=LENGTH)

    with pytest.raises(ConfigError, match="secagg.scale"):
        RoundContext(session=bytes(32), params=params, clip=1.0, scale=1e8)


def test_context_refuses_a_short_session():
    with pytest.raises(ConfigError, match="secagg.session"):
        RoundContext(session=b"round-1", params=resolve_params(num_nodes=3, vector_length=1), clip=1.0, scale=1.0)


# -- what the server sees of one node ---------------------------------------------------


def _byte_uniformity_p_value(values: np.ndarray) -> float:
    counts = np.bincount(values.view(np.uint8), minlength=256)
    return float(stats.chisquare(counts).pvalue)


def test_masked_input_of_all_zeros_is_indistinguishable_from_uniform():
    context = _context(3, vector_length=1 << 20)
    clients, _, boxes = _until_masked(context, [1, 2, 3])

    masked = clients[1].masked_input(np.zeros(1 << 20), boxes[1])

    # A false alarm has probability 1e-3 per run; a leak of the zeros would give p ~ 0.
    assert _byte_uniformity_p_value(masked.values) > 1e-3


def test_masked_input_in_a_sparse_graph_is_indistinguishable_from_uniform():
    context = _context(50, neighbours=34, vector_length=1 << 20)
    assert context.params.threshold == default_threshold(34)
    clients, _, boxes = _until_masked(context, list(range(1, 51)))

    masked = clients[17].masked_input(np.zeros(1 << 20), boxes[17])

    assert _byte_uniformity_p_value(masked.values) > 1e-3
