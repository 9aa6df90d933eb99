"""Fed-Heart-Disease: FedAvg against the pooled and local baselines, next to FLamby.

Runs the canonical plan (``examples/heart_disease.yaml``) on FLamby's split
(train/test 199/104, 172/89, 30/16, 85/45) for training seeds 0..4, under
both normalization options (``federated`` and ``per-site``), and reports the
mean and standard deviation over seeds of the mean per-site test accuracy
(FLamby's metric: each hospital's accuracy on its own test split, averaged
without weights) for:

* ``pooled``: one model on every hospital's training data put together;
* ``local``: each hospital alone, scored on its own test split (each site,
  and the mean over sites);
* ``local ... -> all``: FLamby's "Local i" definition, the model of one
  hospital scored on every hospital's test split (mean per-site accuracy);
* ``FedAvg``: the federation itself (:func:`fedcare.simulation.simulate`).

Every model gets the same local work: ``plan.rounds`` calls to the task's
``train`` with ``plan.local``. FLamby's published numbers (FedAvg 0.685,
pooled 0.735 mean per-site accuracy; logistic regression, their own recipe)
are shown for comparison.

Usage::

    .venv/bin/python benchmarks/flamby_heart.py

Prints the table and writes ``benchmarks/results/flamby_heart.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fedcare.baselines import normalize_sites, run_baseline
from fedcare.data.catalog import DatasetCatalog
from fedcare.metrics import aggregate_site_metrics
from fedcare.plan import Plan, load_plan, parse_plan
from fedcare.simulation import simulate
from fedcare.tasks.registry import TaskRegistry

ROOT = Path(__file__).resolve().parents[1]
PLAN_PATH = ROOT / "examples" / "heart_disease.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "flamby_heart.json"

NORMALIZATIONS = ("federated", "per-site")
SEEDS = (0, 1, 2, 3, 4)
#: FLamby (du Terrail et al., NeurIPS 2022), Fed-Heart-Disease, mean per-site test accuracy.
FLAMBY_REFERENCE = {"FedAvg": 0.685, "pooled": 0.735}


def variant(plan: Plan, *, normalization: str, seed: int) -> Plan:
    """The canonical plan with another normalization and seed, scored on the test split."""
    data = plan.model_dump(mode="json")
    data["dataset"] = {**data["dataset"], "normalization": normalization, "validation_fraction": 0.0}
    data["seed"] = seed
    data["evaluation"] = {"every_rounds": data["rounds"]}  # only the final evaluation is reported
    return parse_plan(data)


def cross_site_accuracy(plan: Plan, parameters: dict[str, Any], registry: TaskRegistry) -> dict[str, float]:
    """FLamby's "Local i": each site's own model, mean per-site accuracy over every site's test split."""
    task = registry.get(plan.task)
    dataset = DatasetCatalog.bundled().get(plan.dataset.name)
    sites = normalize_sites(dataset.load_sites(plan.dataset), mode=plan.dataset.normalization)
    out = {}
    for owner, weights in parameters.items():
        model = task.build_model(dataset.spec(plan.dataset), plan)
        task.set_parameters(model, weights)
        scores = {site: task.evaluate(model, data.test) for site, data in sites.items()}
        out[owner] = aggregate_site_metrics(scores, {s: len(d.test) for s, d in sites.items()})["mean"]["accuracy"]
    return out


def run_seed(plan: Plan, registry: TaskRegistry) -> dict[str, float]:
    """Every row's mean per-site test accuracy for one normalization and seed."""
    row: dict[str, float] = {}
    pooled = run_baseline(plan, mode="pooled", registry=registry)
    row["pooled"] = pooled.mean["accuracy"]
    local = run_baseline(plan, mode="local", registry=registry)
    for site, metrics in local.sites.items():
        row[f"local {site}"] = metrics["accuracy"]
    row["local (mean)"] = local.mean["accuracy"]
    for site, accuracy in cross_site_accuracy(plan, local.parameters, registry).items():
        row[f"local {site} -> all"] = accuracy
    federated = simulate(plan, registry=registry)
    assert federated.final_evaluation is not None
    row["FedAvg"] = federated.final_evaluation.mean["accuracy"]
    for site, metrics in federated.final_evaluation.sites.items():
        row[f"FedAvg @ {site}"] = metrics["accuracy"]
    return row


def summarize(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "per_seed": values,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args()
    torch.set_num_threads(1)  # tiny models: thread start-up costs more than it saves
    started = time.perf_counter()
    canonical = load_plan(PLAN_PATH)
    registry = TaskRegistry.from_entry_points()

    results: dict[str, dict[str, dict[str, Any]]] = {}
    for normalization in NORMALIZATIONS:
        per_seed = [run_seed(variant(canonical, normalization=normalization, seed=s), registry) for s in SEEDS]
        results[normalization] = {name: summarize([r[name] for r in per_seed]) for name in per_seed[0]}

    names = list(results[NORMALIZATIONS[0]])
    width = max(len(n) for n in names) + 2
    title = (
        f"Fed-Heart-Disease, mean per-site test accuracy, mean ± sd over seeds {list(SEEDS)}\n"
        f"plan: {PLAN_PATH.relative_to(ROOT)} (task {canonical.task}, {canonical.rounds} rounds, "
        f"{canonical.local.optimizer} lr {canonical.local.learning_rate:g}, batch {canonical.local.batch_size}, "
        f"epochs {canonical.local.epochs})"
    )
    print(title)
    header = f"{'':<{width}}" + "".join(f"{n:>17}" for n in NORMALIZATIONS) + f"{'FLamby':>9}"
    print(header)
    print("-" * len(header))
    for name in names:
        cells = "".join(
            f"{results[n][name]['mean']:>10.3f} ± {results[n][name]['sd']:.3f}" for n in NORMALIZATIONS
        )
        reference = FLAMBY_REFERENCE.get(name)
        print(f"{name:<{width}}{cells}{'' if reference is None else f'{reference:>9.3f}'}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "description": "Fed-Heart-Disease, mean per-site test accuracy over training seeds",
                "plan": str(PLAN_PATH.relative_to(ROOT)),
                "canonical_plan": canonical.model_dump(mode="json"),
                "seeds": list(SEEDS),
                "results": results,
                "flamby_reference": FLAMBY_REFERENCE,
                "wall_s": time.perf_counter() - started,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(ROOT)} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
