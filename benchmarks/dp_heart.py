"""Fed-Heart-Disease with record-level differential privacy at every hospital.

Every hospital trains with DP-SGD (Opacus: per-example clipping, Gaussian
noise, Poisson sampling) and releases its feature statistics for federated
normalization through the Gaussian mechanism; both count in its budget. The
noise multiplier is derived at each hospital, for its own number of records,
so that the statistics and all the planned rounds spend exactly the plan's
epsilon at ``delta = 1e-3`` (accountant: Opacus PRV).

The table gives the mean per-site test accuracy on FLamby's split, mean and
sd over training seeds 0-4, for epsilon in {0.1, 1, 3, 10} and without DP,
with the plan ``examples/heart_disease.yaml`` (its ``privacy.record_level``
section changed only in epsilon, or turned off). FLamby's DP example reports
0.702 at epsilon 1 and delta 1e-3 with per-site normalization.

``--search`` chooses the DP recipe (learning rate, batch, epochs, rounds,
clipping norm, the share of epsilon the noisy statistics spend) at epsilon 1 on validation splits carved
from each hospital's *training* split (20%, stratified, a different carve for
each seed, as ``heart_hparam_search.py --recarve``); the test split is not
read while choosing.

Usage::

    .venv/bin/python benchmarks/dp_heart.py            # the table (about 2 minutes on 2 cores)
    .venv/bin/python benchmarks/dp_heart.py --seeds 2  # quicker look
    .venv/bin/python benchmarks/dp_heart.py --search   # the validation search behind the plan

Results go to ``benchmarks/results/dp_heart.json`` (``dp_heart_search.json``).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info, write_results  # noqa: E402

from fedcare.data.catalog import DatasetCatalog  # noqa: E402
from fedcare.plan import Plan, load_plan  # noqa: E402
from fedcare.simulation import simulate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CANONICAL = ROOT / "examples" / "heart_disease.yaml"
EPSILONS: tuple[float | None, ...] = (0.1, 1.0, 3.0, 10.0, None)
DELTA = 1e-3
FLAMBY_DP_EPSILON_1 = 0.702

SEARCH_GRID: dict[str, tuple[Any, ...]] = {
    "learning_rate": (0.1, 0.3),
    "batch_size": (32, 64),
    "epochs": (1,),
    "rounds": (5, 10),
    "max_grad_norm": (1.0,),
    "feature_stats_epsilon_share": (0.25, 0.5),
}


def with_privacy(plan: Plan, *, epsilon: float | None, seed: int, **recipe: Any) -> Plan:
    """``plan`` with record-level DP at ``epsilon`` (None: off), the seed and any recipe fields replaced."""
    local_fields = {k: recipe.pop(k) for k in ("learning_rate", "batch_size", "epochs") if k in recipe}
    rounds = recipe.pop("rounds", plan.rounds)
    record_level = plan.privacy.record_level.model_copy(
        update={"enabled": epsilon is not None, "epsilon": epsilon or 1.0, "delta": DELTA, **recipe}
    )
    return plan.model_copy(
        update={
            "seed": seed,
            "rounds": rounds,
            "local": plan.local.model_copy(update=local_fields),
            "evaluation": plan.evaluation.model_copy(update={"every_rounds": rounds}),
            "privacy": plan.privacy.model_copy(update={"record_level": record_level}),
            # The secure sum changes nothing here (tests/federation/test_secure_aggregation.py) but time.
            "secure_aggregation": plan.secure_aggregation.model_copy(update={"enabled": False}),
        }
    )


def mean_site_accuracy(plan: Plan, *, catalog: DatasetCatalog | None = None) -> tuple[float, dict[str, float]]:
    result = simulate(plan, catalog=catalog)
    final = result.final_evaluation
    assert final is not None
    return float(final.mean["accuracy"]), dict(result.epsilon_spent)


def summarize(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def table(seeds: int) -> dict[str, Any]:
    plan = load_plan(CANONICAL)
    rows, cases = [], []
    for epsilon in EPSILONS:
        started = time.perf_counter()
        accuracies, spent = [], []
        for seed in range(seeds):
            accuracy, epsilon_spent = mean_site_accuracy(with_privacy(plan, epsilon=epsilon, seed=seed))
            accuracies.append(accuracy)
            spent.append(max(epsilon_spent.values(), default=0.0))
        summary = summarize(accuracies)
        print(f"... epsilon {epsilon}: {summary['mean']:.3f} ± {summary['sd']:.3f}", flush=True)
        cases.append({"epsilon": epsilon, "delta": DELTA if epsilon else None, "accuracy": summary,
                      "max_epsilon_spent": max(spent), "wall_s": time.perf_counter() - started})  # fmt: skip
        rows.append([
            "none" if epsilon is None else f"{epsilon:g}",
            f"{DELTA:g}" if epsilon else "-",
            f"{summary['mean']:.3f} ± {summary['sd']:.3f}",
            f"{max(spent):.3f}" if epsilon else "-",
            "0.702" if epsilon == 1.0 else "",
        ])  # fmt: skip
    print(format_table(["epsilon", "delta", "mean site accuracy", "max eps spent", "FLamby DP"], rows))
    return {"seeds": seeds, "plan": str(CANONICAL.relative_to(ROOT)), "cases": cases}


def search(seeds: int) -> dict[str, Any]:
    from heart_hparam_search import RecarvedHeartDisease

    plan = load_plan(CANONICAL)
    plan = plan.model_copy(update={"dataset": plan.dataset.model_copy(update={"validation_fraction": 0.2})})
    keys = list(SEARCH_GRID)
    results = []
    for values in itertools.product(*(SEARCH_GRID[k] for k in keys)):
        recipe = dict(zip(keys, values, strict=True))
        scores = [
            mean_site_accuracy(
                with_privacy(plan, epsilon=1.0, seed=seed, **recipe),
                catalog=DatasetCatalog([RecarvedHeartDisease(seed)]),
            )[0]
            for seed in range(seeds)
        ]
        results.append({**recipe, "validation_accuracy": statistics.fmean(scores)})
        print(f"... {recipe}: {results[-1]['validation_accuracy']:.3f}", flush=True)
    results.sort(key=lambda r: -r["validation_accuracy"])
    print(format_table([*keys, "validation acc"], [[r[k] for k in keys] + [f"{r['validation_accuracy']:.3f}"] for r in results[:10]]))
    return {"seeds": seeds, "epsilon": 1.0, "delta": DELTA, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=None, help="training seeds (default: 5, or 3 with --search)")
    parser.add_argument("--search", action="store_true", help="choose the DP recipe on validation splits")
    args = parser.parse_args()
    started = time.perf_counter()
    seeds = args.seeds or (3 if args.search else 5)
    payload = search(seeds) if args.search else table(seeds)
    payload.update(machine=machine_info(), wall_s=time.perf_counter() - started)
    path = write_results("dp_heart_search" if args.search else "dp_heart", payload)
    print(f"results: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
