"""Many nodes on one coordinator: join time, round time and memory for 50, 100 and 200 nodes.

Each configuration runs in a fresh process (``--worker``): a coordinator
(:class:`~fedcare.transport.grpc_server.GrpcTransport` with mutual TLS on
127.0.0.1, :class:`~fedcare.federation.coordinator.Coordinator`, FedAvg)
and light nodes spread over a few child processes (``tests/load/light_nodes.py``:
one real :class:`~fedcare.transport.grpc_client.GrpcNodeChannel` and
certificate per node, one thread each, answering with a known constant
update, no training). Three training rounds and the final evaluation.

Model sizes: ``small`` (1,000 float32 values) and ``1M`` (1,000,000 values,
4 MB). The baseline is the same run with 10 nodes, measured in the same
invocation: times and memory are also given as ratios to it.

Reported per configuration: join time (start of the node processes to
every node joined), mean time per round (the ``round_end`` events'
``duration_s``), the coordinator's peak RSS and its growth during the rounds
(above its level once every node joined), the peak RSS of all processes
together (coordinator + node processes), and the coordinator's peak thread
count.

Usage::

    .venv/bin/python benchmarks/load.py                       # 50, 100, 200 nodes
    .venv/bin/python benchmarks/load.py --nodes 50 100 --processes 2

Results go to ``benchmarks/results/load.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
for _path in (_HERE, _ROOT / "tests" / "load"):
    if str(_path) not in sys.path:  # run as a script or loaded by path
        sys.path.insert(0, str(_path))
from _common import MB, format_table, machine_info, write_results  # noqa: E402

MODEL_SIZES = {"small": 1_000, "1M": 1_000_000}
BASELINE_NODES = 10
ROUNDS = 3
#: A node is taken for gone after 3 x interval + 1 s of silence; with 50 nodes per process on a few cores
#: a heartbeat thread can wait seconds for the interpreter lock.
HEARTBEAT_INTERVAL_S = 3.0


def run_worker(*, certs_dir: Path, num_nodes: int, num_values: int, processes: int, log_dir: Path) -> dict[str, Any]:
    """One configuration in this process; returns its measurements (JSON-able)."""
    import numpy as np
    from harness import run_load
    from light_nodes import expected_fedavg, node_names

    run = run_load(
        certs_dir, num_nodes=num_nodes, num_values=num_values, rounds=ROUNDS, processes=processes,
        heartbeat_interval_s=HEARTBEAT_INTERVAL_S, log_dir=log_dir,
    )  # fmt: skip
    expected = expected_fedavg(run.initial, node_names(num_nodes), rounds=ROUNDS)
    return {
        "nodes": num_nodes,
        "num_values": num_values,
        "processes": processes,
        "join_s": run.join_s,
        "round_s": run.round_s,
        "s_per_round": sum(run.round_s) / len(run.round_s) if run.round_s else None,
        "run_s": run.run_s,
        "coordinator_start_rss_bytes": run.start_rss_bytes,
        "coordinator_joined_rss_bytes": run.joined_rss_bytes,
        "coordinator_peak_rss_bytes": run.peak_rss_bytes,
        "coordinator_growth_bytes": run.rss_growth_bytes,
        "total_peak_rss_bytes": run.peak_total_rss_bytes,
        "coordinator_peak_threads": run.peak_threads,
        "all_took_part": all(len(names) == num_nodes for names in run.participation.values())
        and len(run.participation) == ROUNDS,
        "model_exact": bool(np.array_equal(run.final, expected)),
        "failures": run.failures[:5],
        "node_errors": [error for report in run.node_reports for error in report.get("errors", [])][:5],
        "node_exit_codes": run.node_exit_codes,
    }


def _run_config(*, certs_dir: Path, workdir: Path, num_nodes: int, num_values: int, processes: int) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--certs", str(certs_dir),
               "--worker-nodes", str(num_nodes), "--worker-values", str(num_values), "--processes", str(processes),
               "--log-dir", str(workdir)]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            answer: dict[str, Any] = json.loads(line)
            answer["returncode"] = done.returncode
            return answer
    raise RuntimeError(f"{num_nodes} nodes, {num_values} values: no result (exit {done.returncode}): {done.stderr[-3000:]}")


def run_benchmark(*, nodes: Sequence[int], processes: int) -> dict[str, Any]:
    """Every (model size, node count) configuration, each with its 10-node baseline."""
    from harness import issue_certificates

    payload: dict[str, Any] = {"benchmark": "load", "machine": machine_info(), "rounds": ROUNDS,
                               "processes": processes, "heartbeat_interval_s": HEARTBEAT_INTERVAL_S,
                               "baseline_nodes": BASELINE_NODES, "runs": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fedcare-load-") as tmp:
        workdir = Path(tmp)
        payload["certificates_s"] = issue_certificates(workdir / "certs", max([*nodes, BASELINE_NODES]))
        payload["certificates_issued"] = max([*nodes, BASELINE_NODES])
        for size, num_values in MODEL_SIZES.items():
            for count in [BASELINE_NODES, *nodes]:
                answer = _run_config(certs_dir=workdir / "certs", workdir=workdir, num_nodes=count,
                                     num_values=num_values, processes=min(processes, count))  # fmt: skip
                answer["model"] = size
                payload["runs"].append(answer)
    payload["table"] = _table_rows(payload["runs"])
    payload["all_clean"] = all(
        r["all_took_part"] and r["model_exact"] and not r["failures"] and not r["node_errors"] and r["returncode"] == 0
        for r in payload["runs"]
    )
    return payload


def _table_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    baselines = {r["model"]: r for r in runs if r["nodes"] == BASELINE_NODES}
    rows = []
    for r in runs:
        base = baselines[r["model"]]
        rows.append(
            {
                "model": r["model"],
                "nodes": r["nodes"],
                "join_s": r["join_s"],
                "s_per_round": r["s_per_round"],
                "round_over_baseline": r["s_per_round"] / base["s_per_round"],
                "coordinator_peak_rss_bytes": r["coordinator_peak_rss_bytes"],
                "coordinator_growth_bytes": r["coordinator_growth_bytes"],
                "growth_over_baseline": r["coordinator_growth_bytes"] / max(base["coordinator_growth_bytes"], 1),
                "growth_over_one_update_per_node": r["coordinator_growth_bytes"] / (4 * r["num_values"] * r["nodes"]),
                "total_peak_rss_bytes": r["total_peak_rss_bytes"],
                "coordinator_peak_threads": r["coordinator_peak_threads"],
                "clean": r["all_took_part"] and r["model_exact"] and not r["failures"] and not r["node_errors"],
            }
        )
    return rows


def _render(rows: Sequence[Mapping[str, Any]]) -> str:
    headers = ["model", "nodes", "join s", "s/round", "x base", "coord peak MB", "coord growth MB", "x base",
               "growth / (model x nodes)", "all procs peak MB", "coord threads", "clean"]  # fmt: skip
    table = [
        [
            r["model"], r["nodes"], f"{r['join_s']:.2f}", f"{r['s_per_round']:.3f}", f"{r['round_over_baseline']:.2f}",
            f"{r['coordinator_peak_rss_bytes'] / MB:.0f}", f"{r['coordinator_growth_bytes'] / MB:.0f}",
            f"{r['growth_over_baseline']:.2f}", f"{r['growth_over_one_update_per_node']:.2f}",
            f"{r['total_peak_rss_bytes'] / MB:.0f}", r["coordinator_peak_threads"], "yes" if r["clean"] else "NO",
        ]
        for r in rows
    ]  # fmt: skip
    return format_table(headers, table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, nargs="+", default=[50, 100, 200], help="node counts to run")
    parser.add_argument("--processes", type=int, default=4, help="node processes the nodes are spread over")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-nodes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-values", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(certs_dir=args.certs, num_nodes=args.worker_nodes, num_values=args.worker_values,
                                    processes=args.processes, log_dir=args.log_dir)))  # fmt: skip
        return 0
    started = time.perf_counter()
    payload = run_benchmark(nodes=args.nodes, processes=args.processes)
    payload["benchmark_wall_s"] = time.perf_counter() - started
    payload["load_average_1m_after"] = os.getloadavg()[0]
    path = write_results("load", payload)
    print(_render(payload["table"]))
    print(f"\n{ROUNDS} FedAvg rounds + 1 evaluation; nodes in {args.processes} processes (threads), gRPC over mutual "
          f"TLS on 127.0.0.1; heartbeat {HEARTBEAT_INTERVAL_S:.0f} s; 'x base' is the ratio to {BASELINE_NODES} nodes "
          "with the same model; 1 MB = 10^6 bytes")  # fmt: skip
    print(f"{payload['certificates_issued']} node certificates issued in {payload['certificates_s']:.2f} s")
    print(f"load average (1 min) before/after: {payload['machine']['load_average_1m']:.2f}/"
          f"{payload['load_average_1m_after']:.2f} on {payload['machine']['cpu_count']} cores")
    print(f"results: {path.relative_to(_ROOT) if path.is_relative_to(_ROOT) else path}")
    return 0 if payload["all_clean"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
