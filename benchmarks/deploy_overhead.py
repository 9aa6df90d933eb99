"""What a deployed federation costs beyond the training itself: processes, mutual TLS, gRPC.

The ``overhead`` workload of ``sim_overhead.py`` (10 nodes, 11,000,000
float32 values = 44 MB, no training: each node returns the global weights
plus small uniform noise, 5 rounds, one evaluation at the end), run as a
real deployment on loopback:

* a coordinator process runs :func:`fedcare.deployment.serve` (GrpcTransport
  with mutual TLS on 127.0.0.1, Coordinator, FedAvg) with certificates issued
  by :mod:`fedcare.transport.pki` into a temporary directory;
* it starts 10 node processes (this script with ``--node``), each running
  :func:`fedcare.deployment.run_node`: a GrpcNodeChannel and a Node with the
  numpy-only :class:`NoiseTask` of ``sim_overhead.py``. torch is never imported.

Reported: seconds per round (mean of the ``round_end`` events'
``duration_s``), the coordinator's own peak RSS, the largest node's peak RSS,
and the peak RSS of the whole process tree (coordinator + nodes, polled every
20 ms by ``_common.measure_process``). The in-process ``overhead`` workload runs
in the same invocation, for the deployment / simulation ratio.

Reference: Flower 1.42's deployment engine (no TLS) on a 2-core machine,
about 60 s per round and 12 GB. Goals: under 2.5 s per round and under 3 GB
for the whole tree.

Usage::

    .venv/bin/python benchmarks/deploy_overhead.py             # 1 run of each
    .venv/bin/python benchmarks/deploy_overhead.py --repeat 3  # median time, max memory

Results go to ``benchmarks/results/deploy_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MB, format_table, machine_info, measure_process, median, write_results  # noqa: E402

_ROOT = Path(__file__).resolve().parent.parent
_NODE_COUNT = 10
_ROUNDS = 5

REFERENCE = {"s_per_round": 60.0, "peak_rss_bytes": 12e9}  # Flower 1.42 deployment engine, no TLS, 2 cores
GOALS = {"s_per_round": 2.5, "peak_rss_bytes": 3000 * MB}


def _node_names(count: int) -> list[str]:
    return [f"site-{i}" for i in range(count)]


def _registry_and_catalog() -> tuple[Any, Any]:
    from sim_overhead import NoiseDataset, NoiseTask

    from fedcare.data.catalog import DatasetCatalog
    from fedcare.tasks.registry import TaskRegistry

    return TaskRegistry([(NoiseTask.name, NoiseTask)]), DatasetCatalog([NoiseDataset()])


# -- a node process ------------------------------------------------------------------


def run_node_process(*, name: str, coordinator: str, certs_dir: Path) -> None:
    """One site: join the coordinator over mutual TLS and serve jobs until the run ends."""
    from sim_overhead import NoiseDataset

    from fedcare.deployment import NodeConfig, run_node

    registry, catalog = _registry_and_catalog()
    config = NodeConfig(name=name, datasets={NoiseDataset.info.name: {"site": name}})
    run_node(config, coordinator=coordinator, certs_dir=certs_dir, registry=registry, catalog=catalog,
             give_up_after_s=60)
    if "torch" in sys.modules:
        raise RuntimeError("the node imported torch; the overhead workload must not")


# -- the coordinator process -----------------------------------------------------------


def run_coordinator_process(*, num_nodes: int = _NODE_COUNT, rounds: int = _ROUNDS) -> dict[str, Any]:
    """Issue certificates, serve the plan on 127.0.0.1 and start the node processes.

    Returns
    -------
    dict
        ``round_s``, ``run_wall_s``, ``rounds_completed``, ``failures``,
        ``coordinator_peak_rss_bytes``, ``largest_node_peak_rss_bytes``,
        ``node_exit_codes``, ``max_abs_change``, ``num_values`` and
        ``torch_imported``.
    """
    import numpy as np
    from sim_overhead import NoiseDataset, NoiseTask, overhead_plan

    from fedcare.deployment import serve
    from fedcare.plan import parse_plan
    from fedcare.transport import pki

    names = _node_names(num_nodes)
    plan_data = overhead_plan(num_nodes=num_nodes, rounds=rounds).model_dump(mode="json")
    plan = parse_plan({**plan_data, "nodes": names})
    registry, catalog = _registry_and_catalog()
    round_s: list[float] = []
    children: list[subprocess.Popen[bytes]] = []

    round_cpu_s: list[dict[str, float]] = []
    started_cpu: dict[str, float] = {}

    def cpu_now() -> dict[str, float]:
        """CPU seconds (user + system) used so far by this process and by the node processes."""
        import psutil

        nodes = 0.0
        for child in children:
            try:
                times = psutil.Process(child.pid).cpu_times()
            except psutil.Error:
                continue
            nodes += times.user + times.system
        own = psutil.Process().cpu_times()
        return {"coordinator": own.user + own.system, "nodes": nodes}

    def on_event(event: Mapping[str, Any]) -> None:
        if event["event"] == "round_start":
            started_cpu.update(cpu_now())
        if event["event"] == "round_end":
            round_s.append(float(event["duration_s"]))
            now = cpu_now()
            round_cpu_s.append({side: now[side] - started_cpu[side] for side in now})

    with tempfile.TemporaryDirectory(prefix="fedcare-deploy-") as tmp:
        certs = Path(tmp) / "certs"
        pki.init_ca(certs, federation="bench")
        pki.issue_certificate(certs, role="server", name="coordinator", hosts=("127.0.0.1",))
        for name in names:
            pki.issue_certificate(certs, role="node", name=name)
        logs = [open(Path(tmp) / f"{name}.log", "wb") for name in names]  # noqa: SIM115 - closed below

        def start_nodes(port: int) -> None:
            for name, log in zip(names, logs, strict=True):
                command = [sys.executable, str(Path(__file__).resolve()), "--node", name,
                           "--coordinator", f"127.0.0.1:{port}", "--certs", str(certs)]
                children.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))

        try:
            result = serve(plan, listen="127.0.0.1:0", certs_dir=certs, wait_for_nodes_s=120, registry=registry,
                           catalog=catalog, on_event=on_event, on_listening=start_nodes)
            exit_codes = [child.wait(timeout=60) for child in children]
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
            for log in logs:
                log.close()
        failed_logs = {name: (Path(tmp) / f"{name}.log").read_text(errors="replace")[-2000:]
                       for name, code in zip(names, [c.returncode for c in children], strict=True) if code != 0}

    task = registry.get(NoiseTask.name)
    difference = task.build_model(NoiseDataset().spec(plan.dataset), plan, seed=plan.seed).base
    np.subtract(result.parameters.flatten(), difference, out=difference)
    change = float(np.abs(difference, out=difference).max())
    return {
        "round_s": round_s,
        "round_cpu_s": round_cpu_s,
        "run_wall_s": result.wall_s,
        "rounds_completed": result.rounds_completed,
        "failures": result.failures,
        "max_abs_change": change,
        "num_values": result.parameters.num_elements,
        # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN gives the largest waited-for child.
        "coordinator_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "largest_node_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "coordinator_cpu_s": _cpu_s(resource.RUSAGE_SELF),
        "nodes_cpu_s": _cpu_s(resource.RUSAGE_CHILDREN),
        "node_exit_codes": exit_codes,
        "failed_node_logs": failed_logs,
        "torch_imported": "torch" in sys.modules,
    }


def _cpu_s(who: int) -> dict[str, float]:
    usage = resource.getrusage(who)
    return {"user": usage.ru_utime, "system": usage.ru_stime}


# -- the driver --------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def _deploy_once(workdir: Path) -> tuple[Any, dict[str, Any]]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "coordinator"]
    measurement = measure_process(command, cwd=workdir, env=_child_env())
    if measurement.returncode != 0:
        raise RuntimeError(f"deployment run failed (exit {measurement.returncode}): {measurement.stderr[-3000:]}")
    answer = measurement.last_json_line()
    if answer["rounds_completed"] != _ROUNDS or answer["failures"] or any(answer["node_exit_codes"]):
        raise RuntimeError(f"deployment run was not clean: {json.dumps(answer)[:3000]}")
    return measurement, answer


def run_benchmark(*, repeat: int) -> dict[str, Any]:
    """Run the in-process and the deployed ``overhead`` workload ``repeat`` times each."""
    from sim_overhead import _overhead_once

    payload: dict[str, Any] = {"benchmark": "deploy_overhead", "machine": machine_info(), "repeat": repeat,
                               "nodes": _NODE_COUNT, "rounds": _ROUNDS}
    inproc_runs, deploy_runs = [], []
    with tempfile.TemporaryDirectory(prefix="fedcare-bench-") as tmp:
        workdir = Path(tmp)
        for _ in range(repeat):
            measurement, answer = _overhead_once(workdir)
            inproc_runs.append({"wall_s": measurement.wall_s, "peak_rss_bytes": measurement.peak_rss_bytes, **answer})
            measurement, answer = _deploy_once(workdir)
            deploy_runs.append({"wall_s": measurement.wall_s, "peak_rss_bytes": measurement.peak_rss_bytes,
                                "polls": measurement.polls, **answer})

    def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "runs": runs,
            "s_per_round": median([sum(r["round_s"]) / len(r["round_s"]) for r in runs]),
            "wall_s": median([r["wall_s"] for r in runs]),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
        }

    payload["in_process"] = summary(inproc_runs)
    payload["deployed"] = summary(deploy_runs)
    payload["deployed"]["coordinator_peak_rss_bytes"] = max(r["coordinator_peak_rss_bytes"] for r in deploy_runs)
    payload["deployed"]["largest_node_peak_rss_bytes"] = max(r["largest_node_peak_rss_bytes"] for r in deploy_runs)
    payload["table"] = _table_rows(payload["in_process"], payload["deployed"])
    payload["all_goals_met"] = all(row["goal_met"] for row in payload["table"] if row["goal_met"] is not None)
    return payload


def _table_rows(inproc: Mapping[str, Any], deployed: Mapping[str, Any]) -> list[dict[str, Any]]:
    def row(metric: str, unit: str, value: float, simulated: float | None, key: str | None) -> dict[str, Any]:
        goal = GOALS[key] if key else None
        reference = REFERENCE[key] if key else None
        return {
            "metric": metric,
            "unit": unit,
            "deployed": value,
            "in_process": simulated,
            "deployed_over_in_process": value / simulated if simulated else None,
            "reference": reference,
            "ratio_to_reference": value / reference if reference else None,
            "goal": goal,
            "goal_met": value <= goal if goal is not None else None,
        }

    return [
        row("time per round (mean of 5)", "s", deployed["s_per_round"], inproc["s_per_round"], "s_per_round"),
        row("wall time (process)", "s", deployed["wall_s"], inproc["wall_s"], None),
        row("peak RSS (whole tree)", "B", deployed["peak_rss_bytes"], inproc["peak_rss_bytes"], "peak_rss_bytes"),
        row("peak RSS (coordinator)", "B", deployed["coordinator_peak_rss_bytes"], None, None),
        row("peak RSS (largest node)", "B", deployed["largest_node_peak_rss_bytes"], None, None),
    ]


def _render(rows: Sequence[Mapping[str, Any]]) -> str:
    def show(value: float | None, unit: str) -> str:
        if value is None:
            return "-"
        return f"{value / MB:.0f} MB" if unit == "B" else f"{value:.3f} s"

    def ratio(value: float | None) -> str:
        return "-" if value is None else (f"{value:.2f}x" if value >= 1 else f"1/{1 / value:.1f}")

    table = [
        [
            r["metric"],
            show(r["deployed"], r["unit"]),
            show(r["in_process"], r["unit"]),
            ratio(r["deployed_over_in_process"]),
            show(r["reference"], r["unit"]),
            ratio(r["ratio_to_reference"]),
            ("<= " + show(r["goal"], r["unit"])) if r["goal"] is not None else "-",
            {True: "yes", False: "NO", None: "-"}[r["goal_met"]],
        ]
        for r in rows
    ]
    headers = ["metric", "deployed (mTLS)", "in-process", "deployed/in-proc", "Flower 1.42 deploy", "ratio",
               "goal", "goal met"]
    return format_table(headers, table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each (median time, max memory)")
    parser.add_argument("--worker", choices=["coordinator"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-nodes", type=int, default=_NODE_COUNT, help=argparse.SUPPRESS)
    parser.add_argument("--worker-rounds", type=int, default=_ROUNDS, help=argparse.SUPPRESS)
    parser.add_argument("--node", help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.node:
        run_node_process(name=args.node, coordinator=args.coordinator, certs_dir=args.certs)
        return 0
    if args.worker == "coordinator":
        print(json.dumps(run_coordinator_process(num_nodes=args.worker_nodes, rounds=args.worker_rounds)))
        return 0
    started = time.perf_counter()
    payload = run_benchmark(repeat=max(1, args.repeat))
    payload["benchmark_wall_s"] = time.perf_counter() - started
    payload["load_average_1m_after"] = os.getloadavg()[0]
    path = write_results("deploy_overhead", payload)
    print(_render(payload["table"]))
    per_run = ", ".join(" ".join(f"{s:.3f}" for s in r["round_s"]) for r in payload["deployed"]["runs"])
    print(f"\ndeployed rounds (s): {per_run}")
    print(f"{_NODE_COUNT} node processes + 1 coordinator process, gRPC over mutual TLS on 127.0.0.1; "
          f"times are medians of {payload['repeat']} runs, memory the largest; 1 MB = 10^6 bytes")
    print(f"load average (1 min) before/after: {payload['machine']['load_average_1m']:.2f}/"
          f"{payload['load_average_1m_after']:.2f} on {payload['machine']['cpu_count']} cores")
    print("goal met" if payload["all_goals_met"] else "goal NOT met")
    print(f"results: {path.relative_to(_ROOT) if path.is_relative_to(_ROOT) else path}")
    return 0 if payload["all_goals_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
