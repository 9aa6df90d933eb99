"""Robust aggregation under simulated (research-only) attacks on breast-cancer.

breast-cancer split IID over 10 sites, logistic regression, 20 rounds, local
SGD at learning rate 0.1 (one epoch per round), federated normalization; the
same plan for every aggregator: FedAvg, coordinate median, trimmed mean
(trim fraction 0.1 of 10 = 1 per side), Multi-Krum (f = 3, m = n - f), geometric
median (RFA) and norm bounding (L2 bound 1.0). Scenarios: no attacker; 1 and 3
sites sending ``-10 * update`` (sign flip); 1 and 3 sites adding Gaussian noise
of standard deviation 10 to their update. The attackers are the last sites
(``site-9``, then ``site-7`` to ``site-9``).

Reported: the mean over all 10 sites (attackers included; their test splits are
honest) of the global model's test accuracy after the last round, averaged over
plan seeds 0, 1 and 2 (initial model, training seeds; the data split is fixed).

Usage::

    .venv/bin/python benchmarks/robust.py                 # the full grid (about a minute)
    .venv/bin/python benchmarks/robust.py --rounds 5 --out /tmp/robust.json

Results go to ``benchmarks/results/robust.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info, write_results  # noqa: E402

from fedcare.plan import Plan, parse_plan  # noqa: E402
from fedcare.simulation import simulate  # noqa: E402
from fedcare.simulation_attacks import Attack, GaussianNoise, SignFlip  # noqa: E402

NUM_NODES = 10

AGGREGATORS: dict[str, dict[str, Any]] = {
    "fedavg": {"name": "fedavg"},
    "median": {"name": "median"},
    "trimmed-mean": {"name": "trimmed-mean", "trim_fraction": 0.1},
    "krum": {"name": "krum", "byzantine_nodes": 3},
    "geometric-median": {"name": "geometric-median"},
    "norm-bounding": {"name": "norm-bounding", "max_norm": 1.0},
}


def _attackers(count: int) -> list[str]:
    return [f"site-{NUM_NODES - 1 - i}" for i in reversed(range(count))]


SCENARIOS: dict[str, Mapping[str, Attack]] = {
    "clean": {},
    "sign-flip x10, 1": {site: SignFlip(scale=10.0) for site in _attackers(1)},
    "sign-flip x10, 3": {site: SignFlip(scale=10.0) for site in _attackers(3)},
    "noise sd 10, 1": {site: GaussianNoise(stddev=10.0, seed=7) for site in _attackers(1)},
    "noise sd 10, 3": {site: GaussianNoise(stddev=10.0, seed=7) for site in _attackers(3)},
}


def make_plan(strategy: Mapping[str, Any], *, rounds: int, seed: int = 0) -> Plan:
    """The benchmark's plan with ``strategy`` as ``plan.strategy``."""
    return parse_plan(
        {
            "name": "robust-benchmark",
            "task": "tabular-logistic",
            "dataset": {"name": "breast-cancer", "num_nodes": NUM_NODES, "partition": "iid"},
            "rounds": rounds,
            "local": {"learning_rate": 0.1},
            "strategy": dict(strategy),
            "evaluation": {"every_rounds": rounds},
            "seed": seed,
        }
    )


def run_one(
    strategy: Mapping[str, Any], attacks: Mapping[str, Attack], *, rounds: int, seeds: Sequence[int]
) -> dict[str, Any]:
    """Mean per-site test accuracy after the last round, per seed and averaged, and the wall time (s)."""
    started = time.perf_counter()
    accuracies = []
    for seed in seeds:
        result = simulate(make_plan(strategy, rounds=rounds, seed=seed), attacks=attacks)
        evaluation = result.final_evaluation
        assert evaluation is not None
        accuracies.append(float(evaluation.mean["accuracy"]))
    return {
        "accuracy": sum(accuracies) / len(accuracies),
        "accuracy_per_seed": accuracies,
        "seconds": time.perf_counter() - started,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for aggregator, strategy in AGGREGATORS.items():
        results[aggregator] = {}
        for scenario, attacks in SCENARIOS.items():
            results[aggregator][scenario] = run_one(strategy, attacks, rounds=args.rounds, seeds=args.seeds)
    rows = [
        [aggregator, *(f"{results[aggregator][s]['accuracy']:.3f}" for s in SCENARIOS)] for aggregator in AGGREGATORS
    ]
    print(format_table(["aggregator", *SCENARIOS], rows))
    total_s = time.perf_counter() - started
    print(f"total {total_s:.1f} s")
    payload = {
        "benchmark": "robust",
        "dataset": "breast-cancer",
        "nodes": NUM_NODES,
        "rounds": args.rounds,
        "seeds": args.seeds,
        "learning_rate": 0.1,
        "metric": "mean per-site test accuracy after the last round",
        "aggregators": AGGREGATORS,
        "results": results,
        "total_s": total_s,
        "machine": machine_info(),
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        path = args.out
    else:
        path = write_results("robust", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
