"""Scale-out: 10, 100 and 1,000 simulated sites, in-process and on Ray, side by side.

The federation is PneumoniaMNIST divided into ``num_nodes`` small sites (a
multiple of 5, spread over the dataset's five scanners; see
:class:`fedcare.data.medmnist.PneumoniaMNIST`), ``image-cnn`` with
``model.width`` 4 (1,605 parameters),
FedAvg over every site, 5 rounds of 1 local epoch (batch 32, SGD lr 0.1),
one federated evaluation after the last round. 1,000 sites hold 4 or 5
training images each and most hold no test image, so the final accuracy is
the pooled accuracy over the official test split (624 images) whichever
sites hold them.

Each (backend, sites) pair runs in a fresh subprocess, so interpreter start,
imports, Ray's start (a local instance with 2 CPUs, two worker actors) and
exit all count; the resident memory of the whole process tree (driver,
Ray's GCS and raylet, the worker actors) is polled every 20 ms. RSS sums
count pages shared between processes (the torch libraries) once per
process, so the Ray figures overstate the memory truly used.

Reported: set-up seconds (process start to the start of round 1: imports,
Ray, loading the sites, building the nodes; ``normalization: none``),
seconds per round (mean ``round_end`` ``duration_s``), total wall
seconds, peak RSS and final pooled accuracy. A pair that does not finish
within ``--timeout-s`` is reported as such, not left out.

Usage::

    .venv/bin/python benchmarks/scale.py                      # 10, 100, 1000 sites, both backends
    .venv/bin/python benchmarks/scale.py --sites 10 100 --rounds 2

Results go to ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_STARTED = time.perf_counter()

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MB, format_table, machine_info, measure_process, write_results

__all__ = ["BACKENDS", "run_one", "scale_plan"]

#: What ``--backend`` accepts.
BACKENDS = ("inproc", "ray")
_WIDTH = 4


def scale_plan(*, num_nodes: int, rounds: int) -> Any:
    """The benchmark's plan for ``num_nodes`` sites."""
    from fedcare.plan import parse_plan

    return parse_plan(
        {
            "name": f"scale-{num_nodes}",
            "task": "image-cnn",
            "dataset": {"name": "pneumonia", "num_nodes": num_nodes, "normalization": "none"},
            "model": {"width": _WIDTH},
            "rounds": rounds,
            "min_nodes": max(1, num_nodes // 2),
            "local": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "learning_rate": 0.1},
            "evaluation": {"every_rounds": rounds},
            "seed": 0,
        }
    )


def run_one(*, backend: str, num_nodes: int, rounds: int, num_cpus: int) -> dict[str, Any]:
    """Run one federation in this process and describe it (the child's side)."""
    from fedcare.simulation import simulate

    plan = scale_plan(num_nodes=num_nodes, rounds=rounds)
    marks: dict[str, float] = {}
    round_s: list[float] = []

    def on_event(event: Mapping[str, Any]) -> None:
        if event["event"] == "round_start" and event.get("round") == 1 and "round_1" not in marks:
            marks["round_1"] = time.perf_counter()
        elif event["event"] == "round_end":
            round_s.append(float(event["duration_s"]))

    if backend == "inproc":
        result = simulate(plan, on_event=on_event, max_concurrency=num_cpus)
    else:
        import logging

        import ray

        from fedcare.scale import simulate_on_ray

        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        try:
            result = simulate_on_ray(plan, on_event=on_event)
        finally:
            ray.shutdown()
    final = result.final_evaluation
    return {
        "backend": backend,
        "num_nodes": num_nodes,
        "rounds_completed": result.rounds_completed,
        "setup_s": marks.get("round_1", time.perf_counter()) - _STARTED,
        "round_s": round_s,
        "failures": len(result.failures),
        "accuracy": None if final is None else final.pooled.get("accuracy"),
        "num_values": result.parameters.num_elements,
    }


def _measure(backend: str, num_nodes: int, *, rounds: int, num_cpus: int, timeout_s: float) -> dict[str, Any]:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker", backend,
        "--sites", str(num_nodes), "--rounds", str(rounds), "--num-cpus", str(num_cpus),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    try:
        measurement = measure_process(command, env=env, timeout_s=timeout_s)
    except subprocess.TimeoutExpired:
        return {"backend": backend, "num_nodes": num_nodes, "status": f"did not finish in {timeout_s:g} s"}
    if measurement.returncode != 0:
        return {
            "backend": backend,
            "num_nodes": num_nodes,
            "status": f"failed (exit {measurement.returncode})",
            "stderr_tail": measurement.stderr[-1500:],
        }
    row = measurement.last_json_line()
    row.update(status="ok", wall_s=measurement.wall_s, peak_rss_mb=measurement.peak_rss_bytes / MB)
    return row


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    headers = ["sites", "backend", "set-up s", "s/round", "wall s", "peak RSS MB", "accuracy", "status"]
    lines = []
    for row in rows:
        if row.get("status") != "ok":
            lines.append([row["num_nodes"], row["backend"], "-", "-", "-", "-", "-", row["status"]])
            continue
        per_round = sum(row["round_s"]) / len(row["round_s"]) if row["round_s"] else float("nan")
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        lines.append(
            [
                row["num_nodes"], row["backend"], f"{row['setup_s']:.1f}", f"{per_round:.2f}",
                f"{row['wall_s']:.1f}", f"{row['peak_rss_mb']:.0f}", accuracy,
                "ok" if not row["failures"] else f"ok, {row['failures']} failures",
            ]
        )  # fmt: skip
    return format_table(headers, lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--num-cpus", type=int, default=2, help="cores for either backend (default 2)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per (backend, sites) pair")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        result = run_one(backend=args.worker, num_nodes=args.sites[0], rounds=args.rounds, num_cpus=args.num_cpus)
        print(json.dumps(result))
        return 0
    rows = []
    for num_nodes in args.sites:
        for backend in args.backends:
            row = _measure(backend, num_nodes, rounds=args.rounds, num_cpus=args.num_cpus, timeout_s=args.timeout_s)
            rows.append(row)
            print(_table([row]).splitlines()[-1], flush=True)
    print(_table(rows))
    path = write_results(
        "scale",
        {
            "machine": machine_info(),
            "rounds": args.rounds,
            "num_cpus": args.num_cpus,
            "model": {"task": "image-cnn", "width": _WIDTH},
            "dataset": "pneumonia split into num_nodes sites",
            "runs": rows,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
