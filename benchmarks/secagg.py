"""What SecAgg+ costs over plain aggregation: client masking, coordinator time, mask throughput.

Everything runs in this one process, through the real protocol engine
(:mod:`fedcare.privacy.secagg`). For each number of nodes ``n`` (10, 100),
vector length ``m`` (1,000,000 and 10,000,000 parameters) and dropout (none,
or 10% of the nodes), one round is driven phase by phase:

* every node advertises keys and shares them; the dropped nodes then vanish,
  before sending a masked input, so the server has to rebuild their mask keys
  and undo their pairwise masks with every surviving neighbour;
* each surviving node quantizes and masks the same float32 vector (uniform in
  ``[-1.2, 1.2)``, clip 1.0, scale 2**20), and its masked input is folded into
  the server at once, so only one masked vector is alive at a time (100 masked
  10,000,000-value vectors would be 4 GB);
* the survivors sign the survivor set and reveal their shares; the server
  removes the masks and the sum is dequantized and checked against the exact
  sum of the clipped inputs (within the quantization error bound).

Reported per case:

``client mask s``
    One node's ``masked_input`` (open its share boxes, quantize, expand and add
    its self mask and one pairwise mask per neighbour), median over all the
    surviving nodes of the round; every one is timed, none is extrapolated.
``coordinator s``
    All the server's work in the round: ``receive_keys``, ``receive_shares``,
    every ``add_masked_input``, ``survivors``, ``receive_signatures``,
    ``finish`` (rebuild secrets, remove masks) and ``dequantize_sum``.
``plain s``
    What the coordinator does without SecAgg, in the same run: an
    example-weighted float64 fold of the survivors' float32 vectors with
    :class:`fedcare.strategies.fedavg.FedAvg` (``begin_round``, one
    ``accumulate`` per survivor, ``finalize``).

``upload bytes``
    One node's masked input as it travels (:func:`~fedcare.federation.secure_ring.masked_parameters`):
    in the 32-bit ring, and packed two words to one in the 16-bit ring that
    ``compression.method`` int8, float16 or bfloat16 selects.

and, once, the throughput of :func:`~fedcare.privacy.secagg.masking.expand_mask`
over 10,000,000 words (best of 5; 1 GB = 10^9 bytes).

Goals: with n = 10 and m = 10,000,000, the coordinator within 3x plain
aggregation; with n = 100, m = 10,000,000 and 10 nodes dropped, within 10x;
mask expansion at least 2 GB/s.

Usage::

    .venv/bin/python benchmarks/secagg.py           # the full grid (a few minutes)
    .venv/bin/python benchmarks/secagg.py --quick   # m = 100,000 and 1,000,000
    .venv/bin/python benchmarks/secagg.py --quick --nodes 10 --sizes 5000 --out /tmp/secagg.json

Results go to ``benchmarks/results/secagg.json`` (or ``--out``). Each figure
is one measurement: other work on the machine shows up in it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from fedcare.federation.secure_ring import masked_parameters
from fedcare.params import Parameters
from fedcare.privacy.secagg.config import resolve_params
from fedcare.privacy.secagg.masking import KEY_BYTES, expand_mask
from fedcare.privacy.secagg.protocol import RoundContext, SecAggClient, SecAggServer
from fedcare.privacy.secagg.quantize import dequantize_sum, quantization_error_bound
from fedcare.strategies.fedavg import FedAvg

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info, write_results  # noqa: E402

__all__ = ["GOALS", "mask_throughput", "plain_aggregation_s", "run_benchmark", "run_case"]

_ROOT = Path(__file__).resolve().parent.parent

FULL_NODES = (10, 100)
FULL_SIZES = (1_000_000, 10_000_000)
QUICK_SIZES = (100_000, 1_000_000)
DROPOUT_FRACTION = 0.1
CLIP = 1.0
SCALE = float(2**20)  # 100 * (2**20 + 1) is far below 2**31: no sum can wrap
_INPUT_HALF_WIDTH = 1.2  # inputs are uniform in [-1.2, 1.2): about 1 in 6 coordinates is clipped
_MASK_WORDS = 10_000_000
_QUICK_MASK_WORDS = 1_000_000
_MASK_REPEAT = 5

#: The goals: coordinator time over plain aggregation, per case, and mask expansion throughput.
GOALS: dict[str, Any] = {
    "coordinator_ratio": [
        {"num_nodes": 10, "vector_length": 10_000_000, "dropped": 0, "max_ratio": 3.0},
        {"num_nodes": 100, "vector_length": 10_000_000, "dropped": 10, "max_ratio": 10.0},
    ],
    "mask_expansion_gb_per_s": 2.0,
}


class _Stopwatch:
    """Sums the seconds spent inside each named ``with`` block."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def _dropped_nodes(num_nodes: int, fraction: float, rng: np.random.Generator) -> list[int]:
    if fraction <= 0:
        return []
    count = max(1, round(fraction * num_nodes))
    return sorted(int(i) for i in rng.choice(np.arange(1, num_nodes + 1), size=count, replace=False))


def _max_error(total: np.ndarray, values: np.ndarray, *, count: int) -> float:
    """Largest ``|total - count * clip(values)|``, in chunks so no float64 copy of the vector is made."""
    worst = 0.0
    chunk = 1 << 18
    for start in range(0, values.size, chunk):
        stop = min(start + chunk, values.size)
        expected = np.clip(values[start:stop].astype(np.float64), -CLIP, CLIP) * count
        worst = max(worst, float(np.abs(total[start:stop] - expected).max()))
    return worst


def plain_aggregation_s(values: np.ndarray, *, count: int) -> float:
    """Seconds for FedAvg to fold ``count`` float32 updates (all ``values``) and finalize, example-weighted."""
    spec = (("update", (values.size,)),)
    global_parameters = Parameters.from_flat(np.zeros(values.size, dtype=np.float32), spec)
    update = Parameters.from_flat(values, spec)
    strategy = FedAvg()
    started = time.perf_counter()
    strategy.begin_round(1, global_parameters)
    for k in range(count):
        strategy.accumulate(update, weight=float(100 + k), node_id=f"site-{k}")
    strategy.finalize()
    return time.perf_counter() - started


def run_case(*, num_nodes: int, vector_length: int, dropout: float, seed: int) -> dict[str, Any]:
    """Drive one SecAgg+ round phase by phase, timing each side, then time plain aggregation.

    Returns
    -------
    dict
        The case, the per-phase coordinator seconds, client seconds (median and
        max over survivors), plain aggregation seconds, their ratio and the
        error of the unmasked sum.
    """
    rng = np.random.default_rng(seed)
    params = resolve_params(num_nodes=num_nodes, vector_length=vector_length)
    context = RoundContext(session=os.urandom(32), params=params, clip=CLIP, scale=SCALE)
    values = rng.uniform(-_INPUT_HALF_WIDTH, _INPUT_HALF_WIDTH, size=vector_length).astype(np.float32)
    dropped = _dropped_nodes(num_nodes, dropout, rng)
    clients = {i: SecAggClient(i, context) for i in range(1, num_nodes + 1)}
    server = SecAggServer(context)
    coordinator = _Stopwatch()
    client_setup_s: list[float] = []
    client_mask_s: list[float] = []
    upload_bytes: dict[int, int] = {}

    adverts = {i: client.advertise_keys() for i, client in clients.items()}
    with coordinator("receive_keys"):
        rosters = server.receive_keys(adverts)
    shares = {}
    for i, client in clients.items():
        started = time.perf_counter()
        shares[i] = client.share_keys(rosters[i])
        client_setup_s.append(time.perf_counter() - started)
    with coordinator("receive_shares"):
        boxes = server.receive_shares(shares)
    del adverts, rosters, shares
    # The dropped nodes vanish here: they shared keys but send no masked input.
    for i in (i for i in clients if i not in dropped):
        started = time.perf_counter()
        masked = clients[i].masked_input(values, boxes[i])
        client_mask_s.append(time.perf_counter() - started)
        with coordinator("add_masked_input"):
            server.add_masked_input(i, masked.values)
        if not upload_bytes:  # the same for every node: its wire size, 32-bit and 16-bit ring
            upload_bytes = {bits: masked_parameters(masked.values, ring_bits=bits).nbytes for bits in (32, 16)}
        del masked  # one masked vector alive at a time
    with coordinator("survivors"):
        survivors = server.survivors()
    signatures = {i: clients[i].consistency_check(survivors) for i in survivors}
    with coordinator("receive_signatures"):
        agreed = server.receive_signatures(signatures)
    reveals = {i: clients[i].unmask(survivors, agreed) for i in survivors}
    with coordinator("finish"):
        total_uint32 = server.finish(reveals)
    with coordinator("dequantize_sum"):
        total = dequantize_sum(total_uint32, scale=SCALE)
    del total_uint32, clients, server

    error = _max_error(total, values, count=len(survivors))
    bound = quantization_error_bound(scale=SCALE, num_summed=len(survivors))
    del total
    plain_s = plain_aggregation_s(values, count=len(survivors))
    coordinator_s = coordinator.total
    return {
        "num_nodes": num_nodes,
        "vector_length": vector_length,
        "dropped": len(dropped),
        "survivors": len(survivors),
        "neighbours": params.neighbours,
        "threshold": params.threshold,
        "client_mask_s": float(np.median(client_mask_s)),
        "client_mask_max_s": max(client_mask_s),
        "clients_timed": len(client_mask_s),
        "client_share_keys_s": float(np.median(client_setup_s)),
        "coordinator_s": coordinator_s,
        "coordinator_phases_s": coordinator.seconds,
        "plain_s": plain_s,
        "ratio": coordinator_s / plain_s if plain_s > 0 else None,
        "max_abs_error": error,
        "error_bound": bound,
        "sum_correct": error < bound,
        "upload_bytes_32": upload_bytes[32],
        "upload_bytes_16": upload_bytes[16],
    }


def mask_throughput(*, words: int, repeat: int = _MASK_REPEAT) -> dict[str, Any]:
    """Best-of-``repeat`` seconds for :func:`expand_mask` of ``words`` uint32 values, and GB/s."""
    key = os.urandom(KEY_BYTES)
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        mask = expand_mask(key, words)
        best = min(best, time.perf_counter() - started)
        del mask
    return {"words": words, "bytes": 4 * words, "best_s": best, "gb_per_s": 4 * words / best / 1e9}


def _goal_for(case: Mapping[str, Any]) -> float | None:
    for goal in GOALS["coordinator_ratio"]:
        if all(case[key] == goal[key] for key in ("num_nodes", "vector_length", "dropped")):
            return float(goal["max_ratio"])
    return None


def run_benchmark(
    *, nodes: Sequence[int], sizes: Sequence[int], mask_words: int, progress: bool = True
) -> dict[str, Any]:
    """Run every (nodes, size, dropout) case and the mask throughput; return the JSON payload."""
    payload: dict[str, Any] = {
        "benchmark": "secagg",
        "machine": machine_info(),
        "clip": CLIP,
        "scale": SCALE,
        "dropout_fraction": DROPOUT_FRACTION,
        "goals": GOALS,
        "cases": [],
    }
    seed = 0
    for num_nodes in nodes:
        for size in sizes:
            for dropout in (0.0, DROPOUT_FRACTION):
                if progress:
                    print(f"... n={num_nodes} m={size:,} dropout={dropout:.0%}", file=sys.stderr, flush=True)
                case = run_case(num_nodes=num_nodes, vector_length=size, dropout=dropout, seed=seed)
                seed += 1
                goal = _goal_for(case)
                case["goal_ratio"] = goal
                case["goal_met"] = None if goal is None or case["ratio"] is None else case["ratio"] <= goal
                payload["cases"].append(case)
    throughput = mask_throughput(words=mask_words)
    throughput["goal_gb_per_s"] = GOALS["mask_expansion_gb_per_s"]
    throughput["goal_met"] = throughput["gb_per_s"] >= GOALS["mask_expansion_gb_per_s"]
    payload["mask_expansion"] = throughput
    verdicts = [c["goal_met"] for c in payload["cases"] if c["goal_met"] is not None] + [throughput["goal_met"]]
    payload["all_sums_correct"] = all(c["sum_correct"] for c in payload["cases"])
    payload["all_goals_met"] = all(verdicts) and payload["all_sums_correct"]
    return payload


def _render(payload: Mapping[str, Any]) -> str:
    rows = []
    for case in payload["cases"]:
        goal = case["goal_ratio"]
        rows.append(
            [
                case["num_nodes"],
                f"{case['vector_length']:,}",
                case["dropped"],
                f"{case['client_mask_s']:.3f}",
                f"{case['coordinator_s']:.3f}",
                f"{case['plain_s']:.3f}",
                f"{case['ratio']:.2f}x" if case["ratio"] is not None else "-",
                f"<= {goal:g}x" if goal is not None else "-",
                {True: "yes", False: "NO", None: "-"}[case["goal_met"]],
                "yes" if case["sum_correct"] else "NO",
            ]
        )
    table = format_table(
        ["nodes", "params", "dropped", "client mask s", "coordinator s", "plain s", "secagg/plain", "goal",
         "goal met", "sum ok"],
        rows,
    )
    phases = []
    for case in payload["cases"]:
        seconds = case["coordinator_phases_s"]
        phases.append(
            [
                case["num_nodes"],
                f"{case['vector_length']:,}",
                case["dropped"],
                f"{seconds.get('receive_keys', 0.0) + seconds.get('receive_shares', 0.0):.3f}",
                f"{seconds.get('add_masked_input', 0.0):.3f}",
                f"{seconds.get('survivors', 0.0) + seconds.get('receive_signatures', 0.0):.3f}",
                f"{seconds.get('finish', 0.0):.3f}",
                f"{seconds.get('dequantize_sum', 0.0):.3f}",
                f"{case['client_share_keys_s']:.3f}",
            ]
        )
    breakdown = format_table(
        ["nodes", "params", "dropped", "keys+shares s", "fold inputs s", "survivors+sigs s", "finish s",
         "dequantize s", "client share_keys s"],
        phases,
    )
    mask = payload["mask_expansion"]
    widest = max(payload["cases"], key=lambda case: case["vector_length"])
    lines = [
        table,
        "",
        "coordinator phases:",
        breakdown,
        "",
        f"mask expansion: expand_mask of {mask['words']:,} words ({mask['bytes'] / 1e6:.0f} MB) in "
        f"{mask['best_s'] * 1e3:.1f} ms = {mask['gb_per_s']:.2f} GB/s (goal >= {mask['goal_gb_per_s']:g} GB/s: "
        f"{'yes' if mask['goal_met'] else 'NO'})",
        f"masked upload per node, {widest['vector_length']:,} params: {widest['upload_bytes_32']:,} bytes in the "
        f"32-bit ring, {widest['upload_bytes_16']:,} in the 16-bit ring (compression int8/float16/bfloat16): "
        f"{widest['upload_bytes_16'] / widest['upload_bytes_32']:.2f}x",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"vector lengths {', '.join(f'{s:,}' for s in QUICK_SIZES)} instead of "
                             f"{', '.join(f'{s:,}' for s in FULL_SIZES)}; mask throughput over "
                             f"{_QUICK_MASK_WORDS:,} words")
    parser.add_argument("--nodes", type=int, nargs="+", metavar="N", help="numbers of nodes (default 10 100)")
    parser.add_argument("--sizes", type=int, nargs="+", metavar="M", help="vector lengths, overriding the grid")
    parser.add_argument("--out", type=Path, help="write the JSON here instead of benchmarks/results/secagg.json")
    args = parser.parse_args(argv)
    nodes = tuple(args.nodes or FULL_NODES)
    sizes = tuple(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES))
    if min(nodes) < 3 or min(sizes) < 1:
        parser.error("--nodes must be >= 3 and --sizes >= 1")
    started = time.perf_counter()
    payload = run_benchmark(nodes=nodes, sizes=sizes, mask_words=_QUICK_MASK_WORDS if args.quick else _MASK_WORDS)
    payload["benchmark_wall_s"] = time.perf_counter() - started
    payload["load_average_1m_after"] = os.getloadavg()[0]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        path = args.out
    else:
        path = write_results("secagg", payload)
    print(_render(payload))
    print(f"\nclient mask s: median over the {'/'.join(str(c['clients_timed']) for c in payload['cases'])} "
          "surviving nodes of each round, every one timed (none extrapolated)")
    print("coordinator s: all server phases + dequantize_sum; plain s: FedAvg fold of the survivors' float32 "
          "vectors in float64 + finalize; one measurement each")
    print(f"load average (1 min) before/after: {payload['machine']['load_average_1m']:.2f}/"
          f"{payload['load_average_1m_after']:.2f} on {payload['machine']['cpu_count']} cores "
          "(other work on the machine slows the timings)")
    print(f"total benchmark time: {payload['benchmark_wall_s']:.1f} s")
    print(f"results: {path.relative_to(_ROOT) if path.resolve().is_relative_to(_ROOT) else path}")
    return 0 if payload["all_goals_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
