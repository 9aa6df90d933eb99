"""What update compression saves on slow links, and what it costs in accuracy.

For heart disease (``tabular-mlp``, 64 hidden units: 961 weights, FedAvg, the
four FLamby hospitals) and PneumoniaMNIST (``image-cnn`` of
``benchmarks/imaging.py``, five simulated hospitals, GroupNorm, Adam), the
same plan runs in simulation with ``compression.method`` none, float16,
int8 and top-k 1 % (error feedback on, dense tensors refitted: the default),
and top-k 1 % without the refit, once per plan seed (0 to 4 by default).
PneumoniaMNIST runs 60 rounds and is also scored after round 30 of the same
runs (``--pneumonia-also-at``): one table row per method and horizon, the
bytes and times of a row counting its rounds only. Reported per case, from
the run's events (the lines of ``metrics.jsonl``), as means over the seeds:

``up B/round/site``
    Payload bytes a site uploads per training round (``round_end`` ``bytes``:
    the update as sent, its metrics included), mean over rounds and sites; the
    JSON keeps every site's mean.
``ratio``
    Uncompressed upload over this one.
``update ratio``
    The update's own float32 bytes over its compressed bytes (``round_end``
    ``compression.ratio``), without the metrics that travel beside it.
``round s @1Mbit``
    Computed, not measured through a proxy: the slowest site's bytes down and
    up in a round at 125,000 bytes/s, plus the round's measured compute time
    in the simulation. The download (the global model) is not compressed.
    ``tests/faults/test_throttled_link.py`` runs the same methods through a
    real 1 Mbit/s proxy.
``accuracy``, ``AUC``, ``loss pts``
    Pooled accuracy and ROC AUC on the sites' test splits after the last
    round, and the accuracy lost against uncompressed, in percentage points;
    ``per seed`` lists each seed's accuracy. One seed's accuracy moves by
    several points with the decision threshold of the largest site (float16,
    which changes an update by one part in 2,000, moves it by a point), so
    the goals are judged on the mean.

Goals: int8 cuts the upload 4x at no more than 0.5 points of accuracy; top-k
1 % with error feedback cuts it 20x or more at no more than 1 point.

Usage::

    .venv/bin/python benchmarks/bandwidth.py                  # both datasets
    .venv/bin/python benchmarks/bandwidth.py --datasets heart  # seconds
    .venv/bin/python benchmarks/bandwidth.py --pneumonia-rounds 6 --pneumonia-also-at 3 --seeds 0 --out /tmp/b.json

Results go to ``benchmarks/results/bandwidth.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info, write_results  # noqa: E402

from fedcare.plan import Plan, parse_plan  # noqa: E402
from fedcare.simulation import simulate  # noqa: E402

__all__ = ["GOALS", "METHODS", "heart_plan", "pneumonia_plan", "run_case"]

#: Method label -> plan.compression.
METHODS: dict[str, dict[str, Any]] = {
    "none": {"method": "none"},
    "float16": {"method": "float16"},
    "int8": {"method": "int8"},
    "topk 1%": {"method": "topk", "topk_fraction": 0.01, "error_feedback": True},
    "topk 1% no refit": {"method": "topk", "topk_fraction": 0.01, "error_feedback": True, "refit_dense": False},
}
#: Method label -> (least upload ratio, most accuracy points lost).
GOALS = {"int8": (4.0, 0.5), "topk 1%": (20.0, 1.0)}
LINK_BYTES_PER_S = 125_000  # 1 Mbit/s


def heart_plan(*, rounds: int, compression: dict[str, Any], seed: int = 0, evaluate_every: int | None = None) -> Plan:
    """``plans/heart_disease.yaml``'s federation with a 64-unit MLP and no secure aggregation."""
    return parse_plan(
        {
            "name": "heart-disease-bandwidth",
            "task": "tabular-mlp",
            "model": {"hidden_units": 64},
            "dataset": {"name": "heart-disease", "normalization": "federated"},
            "rounds": rounds,
            "min_nodes": 2,
            "local": {"epochs": 2, "batch_size": 32, "optimizer": "sgd", "learning_rate": 0.01},
            "strategy": {"name": "fedavg"},
            "evaluation": {"every_rounds": evaluate_every or rounds},
            "compression": compression,
            "seed": seed,
        }
    )


def pneumonia_plan(
    *, rounds: int, compression: dict[str, Any], seed: int = 0, evaluate_every: int | None = None
) -> Plan:
    """``benchmarks/imaging.py``'s FedAvg plan (width 16, GroupNorm) with ``compression``, evaluated every ``evaluate_every`` rounds."""
    from imaging import make_plan  # the imaging benchmark's own plan

    plan = make_plan(rounds=rounds, norm="group", seed=seed)
    return parse_plan({**plan.model_dump(mode="json", exclude_unset=True), "compression": compression,
                       "evaluation": {"every_rounds": evaluate_every or rounds}})  # fmt: skip


def run_case(plan: Plan, *, horizons: Sequence[int] = ()) -> dict[int, dict[str, Any]]:
    """Simulate ``plan``; per horizon (``plan.rounds`` and each of ``horizons``), scores and costs up to that round.

    Each horizon must be a round the plan evaluates after (a multiple of
    ``plan.evaluation.every_rounds``). Upload bytes per round and site, and
    the round time at 1 Mbit/s, are means over the rounds up to the horizon.
    """
    events: list[dict[str, Any]] = []
    started = time.perf_counter()
    result = simulate(plan, on_event=events.append)
    wall_s = time.perf_counter() - started
    evaluations = {e.round: e for e in result.evaluations}
    cases: dict[int, dict[str, Any]] = {}
    for horizon in sorted({*horizons, plan.rounds}):
        if horizon not in evaluations:
            raise ValueError(f"round {horizon} was not evaluated (plan.evaluation.every_rounds: {plan.evaluation.every_rounds})")
        ends = [e for e in events if e["event"] == "round_end" and e["round"] <= horizon]
        sites = sorted({n for e in ends for n in e["bytes"]})
        up = {n: sum(e["bytes"][n]["up"] for e in ends if n in e["bytes"]) / len(ends) for n in sites}
        down = {n: sum(e["bytes"][n]["down"] for e in ends if n in e["bytes"]) / len(ends) for n in sites}
        compute_s = sum(e["duration_s"] for e in ends) / len(ends)
        ratios = [r for e in ends for r in e.get("compression", {}).get("ratio", {}).values()]
        link_s = max((down[n] + up[n]) / LINK_BYTES_PER_S for n in sites)
        scores = evaluations[horizon].pooled
        cases[horizon] = {
            "up_bytes_per_round": up,
            "down_bytes_per_round": down,
            "up_bytes_per_round_mean": sum(up.values()) / len(up),
            "update_ratio": sum(ratios) / len(ratios) if ratios else 1.0,
            "compute_s_per_round": compute_s,
            "round_s_at_1mbit": link_s + compute_s,
            "accuracy": scores["accuracy"],
            "roc_auc": scores.get("roc_auc"),
            "failures": len([f for f in result.failures if f["round"] <= horizon]),
            "wall_s": wall_s,
        }
    return cases


def _mean_over_seeds(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row from the runs of each seed: numbers averaged, each seed's run kept under ``seeds``."""
    row: dict[str, Any] = {"seeds": list(runs)}
    for key, value in runs[0].items():
        if key == "seed":
            continue
        if isinstance(value, dict):
            row[key] = {n: statistics.fmean(run[key][n] for run in runs) for n in value}
        elif isinstance(value, int | float) and all(run[key] is not None for run in runs):
            row[key] = statistics.fmean(run[key] for run in runs)
        else:
            row[key] = value
    return row


def run(
    *,
    datasets: Sequence[str],
    heart_rounds: int,
    pneumonia_rounds: int,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    pneumonia_also_at: Sequence[int] = (),
) -> dict[str, Any]:
    """Every method on every dataset and seed. ``cases`` is keyed ``DATASET`` (the last round) and ``DATASET@R``."""
    cases: dict[str, dict[str, Any]] = {}
    for dataset in datasets:
        rounds = heart_rounds if dataset == "heart" else pneumonia_rounds
        earlier = () if dataset == "heart" else tuple(r for r in pneumonia_also_at if r < rounds)
        every = math.gcd(rounds, *earlier)
        make = heart_plan if dataset == "heart" else pneumonia_plan
        rows: dict[int, dict[str, Any]] = {horizon: {} for horizon in (*earlier, rounds)}
        for label, compression in METHODS.items():
            runs: dict[int, list[dict[str, Any]]] = {horizon: [] for horizon in rows}
            for seed in seeds:
                plan = make(rounds=rounds, compression=compression, seed=seed, evaluate_every=every)
                for horizon, case in run_case(plan, horizons=earlier).items():
                    runs[horizon].append({"seed": seed, **case})
                summary = {k: v for k, v in runs[rounds][-1].items() if not isinstance(v, dict)}
                print(f"{dataset} {label}: {json.dumps(summary)}", file=sys.stderr, flush=True)
            for horizon in rows:
                rows[horizon][label] = _mean_over_seeds(runs[horizon])
        for horizon, methods in rows.items():
            plain = methods["none"]
            for label, row in methods.items():
                row["upload_ratio"] = plain["up_bytes_per_round_mean"] / row["up_bytes_per_round_mean"]
                row["accuracy_loss_points"] = 100 * (plain["accuracy"] - row["accuracy"])
                if label in GOALS:
                    least_ratio, most_loss = GOALS[label]
                    row["meets_goal"] = row["upload_ratio"] >= least_ratio and row["accuracy_loss_points"] <= most_loss
            key = dataset if horizon == rounds else f"{dataset}@{horizon}"
            cases[key] = {"dataset": dataset, "rounds": horizon, "methods": methods}
    return {"benchmark": "bandwidth", "goals": GOALS, "link_bytes_per_s": LINK_BYTES_PER_S, "seeds": list(seeds),
            "machine": machine_info(), "cases": cases}  # fmt: skip


def render(payload: dict[str, Any]) -> str:
    headers = ["dataset", "rounds", "method", "up B/round/site", "ratio", "update ratio", "round s @1Mbit", "accuracy", "AUC",
               "loss pts", "goal", "per seed"]  # fmt: skip
    rows = []
    for case in payload["cases"].values():
        dataset = case["dataset"]
        for label, row in case["methods"].items():
            goal = "" if "meets_goal" not in row else ("met" if row["meets_goal"] else "MISSED")
            rows.append([
                dataset, case["rounds"], label, round(row["up_bytes_per_round_mean"]), f"{row['upload_ratio']:.2f}x",
                f"{row['update_ratio']:.2f}x",
                f"{row['round_s_at_1mbit']:.2f}", f"{row['accuracy']:.4f}",
                "" if row["roc_auc"] is None else f"{row['roc_auc']:.4f}", f"{row['accuracy_loss_points']:+.2f}", goal,
                " / ".join(f"{run['accuracy']:.3f}" for run in row["seeds"]),
            ])  # fmt: skip
    return format_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=("heart", "pneumonia"), default=["heart", "pneumonia"])
    parser.add_argument("--heart-rounds", type=int, default=30)
    parser.add_argument("--pneumonia-rounds", type=int, default=60)
    parser.add_argument("--pneumonia-also-at", nargs="*", type=int, default=[30],
                        help="earlier rounds at which the PneumoniaMNIST runs are also scored")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="plan seeds; results are their means")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    payload = run(datasets=args.datasets, heart_rounds=args.heart_rounds, pneumonia_rounds=args.pneumonia_rounds,
                  seeds=args.seeds, pneumonia_also_at=args.pneumonia_also_at)  # fmt: skip
    if args.out is None:
        path = write_results("bandwidth", payload)
    else:
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        path = args.out
    print(render(payload))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
