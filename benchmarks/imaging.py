"""PneumoniaMNIST over five shifted 'scanners': pooled, local, FedAvg, FedProx and FedBN.

The bundled ``pneumonia`` dataset (:class:`fedcare.data.medmnist.PneumoniaMNIST`)
divides the official training split of PneumoniaMNIST (28x28 paediatric chest
X-rays, 0 normal / 1 pneumonia) among five simulated hospitals with
Dirichlet(0.5) label skew, and every image of a site goes through that site's
fixed 'scanner' (gamma and contrast, blur, noise, low resolution, darker and
flatter). Each site's test split is its share of the official test split, so
the sites' test splits together are the official 624-image test split.

Rows (task ``image-cnn``, plan :func:`make_plan`, seed 0, 30 rounds):

* ``pooled``: one model on the union of the sites' training data
  (:func:`fedcare.baselines.run_baseline`, ``mode="pooled"``);
* ``local``: each site alone (``mode="local"``); each site's model scores its
  own test images, and the scores of all sites together are scored on the
  official test split;
* ``FedAvg``, ``FedProx``, ``FedBN`` (BatchNorm layers stay at each site) and
  ``FedAvg (BatchNorm)``: the federation itself
  (:func:`fedcare.simulation.simulate`, in-process coordinator and nodes).

Normalization layers (column ``norm``): BatchNorm for ``pooled``, ``local``
and ``FedBN``; GroupNorm for FedAvg and FedProx, because averaging BatchNorm
running statistics over sites whose scanners shift the intensities leaves a
global model whose statistics fit no site (Hsieh et al. 2020, "The non-IID
data quagmire"); the ``FedAvg (BatchNorm)`` row shows what happens otherwise.

Every row reports ROC AUC and accuracy (threshold 0.5) on the official test
split: each test image is scored by the model its site holds at the end (the
global model; for FedBN the global model with the site's own BatchNorm; for
``local`` the site's own model), and the 624 scores are put together. The
benchmark's task records the scores as each node evaluates (this is a
simulation; in a deployment the scores never leave the site). Every model
gets the same local work: 30 calls to ``train`` with ``plan.local``.

Hyperparameters are chosen on the official **validation** split (each site's
share of it, ``dataset.validation_fraction > 0``), never on the test split.
The script tunes FedProx's ``proximal_mu`` from ``{0.001, 0.01, 0.1}`` by
validation AUC (printed, and recorded in the JSON under ``tuning``). The
recipe (width-16 CNN, dropout 0.2, flip-and-shift augmentation,
class-balanced loss weights, Adam at the MedMNIST v2 paper's learning rate
0.001, weight decay 1e-4, batch 64, 1 local epoch per round, 30 rounds) and
the GroupNorm choice for FedAvg and FedProx were fixed from the paper's
setting and pilot runs scored on the validation split only (524 images; the
test split was not looked at to choose anything). FedBN, the best federated
row, 30 rounds, validation AUC / accuracy at threshold 0.5:

* recipe above (width 16): seed 0 0.983 / 0.861 and 0.986 / 0.863 (two runs,
  measured before dropout masks were seeded per round, see below), seed 1
  0.981 / 0.849;
* width 24: 0.970 / 0.853; width 32: 0.980 / 0.828 (and twice the time);
* 2 local epochs: 0.975 / 0.880 (twice the time); 50 rounds: 0.921 / 0.798;
* learning rate 0.002: 0.982 / 0.840; 0.0005 with 2 epochs: seed 0
  0.978 / 0.868, seed 1 0.966 / 0.830; 0.0005 (seed 1): 0.973 / 0.874;
* batch 32: 0.876 / 0.777; intensity jitter 0.1: 0.891 / 0.790;
  dropout 0.5: seed 0 0.985 / 0.897, seed 1 0.903 / 0.786.

No variant beat the recipe on validation AUC averaged over the seeds tried,
so it was kept. The final-round model is unstable (single runs range from
validation AUC 0.88 to 0.99), so a row's test numbers depend on the seed by a
few points. Validation accuracy (74% pneumonia, like the training split) is
not the test split's (62.5% pneumonia).

The validation figures above, and two test runs of this configuration (FedBN
0.959 / 0.853 and 0.963 / 0.883), were measured while dropout drew its masks
from torch's process-wide generator, which nodes training in parallel
threads share, so runs differed. Dropout now draws from a generator per
layer seeded by the round's seed (``fedcare.tasks.torch_task.dropout``), and
a run is bit-reproducible: seed 0 gives FedBN test AUC 0.954, accuracy 0.886
(pooled 0.965 / 0.912) every time; the goals pass with little margin.
Class-balanced weights matter for accuracy at threshold 0.5: the test split
has more normal images (234 of 624) than the training split (1,214 of
4,708).

Goals (checked in the table): best federated AUC >= 0.95 and accuracy >=
0.88 (the MedMNIST v2 paper reports ResNet-18 at 28x28, centralized: AUC
0.944, accuracy 0.854), in under 10 minutes on 2 CPU cores.

Usage::

    .venv/bin/python benchmarks/imaging.py            # a few minutes on 2 cores
    .venv/bin/python benchmarks/imaging.py --quick --out /tmp/imaging.json

``--quick`` runs pooled, FedAvg and FedBN only, 10 rounds and no tuning (a smoke
test, not a result). Results go to ``benchmarks/results/imaging.json`` (or
``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info, write_results  # noqa: E402

from fedcare.baselines import run_baseline  # noqa: E402
from fedcare.metrics import binary_metrics  # noqa: E402
from fedcare.plan import Plan, parse_plan  # noqa: E402
from fedcare.simulation import simulate  # noqa: E402
from fedcare.tasks.base import Split  # noqa: E402
from fedcare.tasks.imaging import ImageCNNTask  # noqa: E402
from fedcare.tasks.registry import TaskRegistry  # noqa: E402

#: Row label -> plan.strategy.name.
STRATEGIES = {"FedAvg": "fedavg", "FedProx": "fedprox", "FedBN": "fedbn", "FedAvg (BatchNorm)": "fedavg"}
#: Row label -> plan.model.norm: GroupNorm where BatchNorm statistics would be averaged over shifted sites.
NORMS = {
    "pooled": "batch", "local": "batch", "FedAvg": "group", "FedProx": "group", "FedBN": "batch",
    "FedAvg (BatchNorm)": "batch",
}  # fmt: skip
QUICK_STRATEGIES = ("FedAvg", "FedBN")
ROUNDS = 30
QUICK_ROUNDS = 10
SEED = 0
LEARNING_RATE = 0.001  # Adam's default, and the MedMNIST v2 paper's
PROXIMAL_MUS = (0.001, 0.01, 0.1)
DEFAULT_PROXIMAL_MU = 0.01
TEST_IMAGES = 624  # the official PneumoniaMNIST test split
GOALS = {"auc": 0.95, "accuracy": 0.88, "wall_s": 600.0}
MEDMNIST_REFERENCE = {"ResNet-18 (28), centralized": {"auc": 0.944, "accuracy": 0.854}}


def make_plan(
    *,
    rounds: int,
    seed: int = SEED,
    strategy: dict[str, Any] | None = None,
    norm: str = "batch",
    validation: bool = False,
    width: int = 16,
) -> Plan:
    """The benchmark's plan: image-cnn on ``pneumonia``, evaluated once, after the last round."""
    return parse_plan(
        {
            "name": "pneumonia-imaging",
            "task": "image-cnn",
            "dataset": {
                "name": "pneumonia",
                "normalization": "none",  # images are already in [0, 1]
                "validation_fraction": 0.1 if validation else 0.0,  # > 0: the official validation split
            },
            "rounds": rounds,
            "seed": seed,
            "evaluation": {"every_rounds": rounds},
            "strategy": strategy or {"name": "fedavg"},
            "model": {"width": width, "norm": norm, "dropout": 0.2, "augment": "flip-crop", "crop_padding": 2},
            "local": {
                "epochs": 1,
                "batch_size": 64,
                "optimizer": "adam",
                "learning_rate": LEARNING_RATE,
                "weight_decay": 0.0001,
                "class_weighting": "balanced",
            },
        }
    )


class _ScoreRecorder:
    """Collects (labels, probabilities) of every evaluation, from any node thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.scores: list[tuple[np.ndarray, np.ndarray]] = []

    def registry(self) -> TaskRegistry:
        """A registry whose ``image-cnn`` records the scores of each evaluation here."""
        recorder = self

        class RecordingCNN(ImageCNNTask):
            def evaluate(self, model: Any, data: Split) -> dict[str, float]:
                if len(data) == 0:
                    return {}
                model.eval()
                with torch.inference_mode():
                    output = model(torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32)))
                probability = torch.sigmoid(output.reshape(-1)).numpy().astype(np.float64)
                with recorder._lock:
                    recorder.scores.append((data.y.copy(), probability))
                return binary_metrics(data.y, probability)

        return TaskRegistry([("image-cnn", RecordingCNN)])

    def union_metrics(self, *, expected: int | None) -> dict[str, float]:
        """AUC and accuracy of all recorded scores together; the scores are then cleared."""
        y = np.concatenate([labels for labels, _ in self.scores])
        p = np.concatenate([probability for _, probability in self.scores])
        self.scores.clear()
        if expected is not None and len(y) != expected:
            raise RuntimeError(f"recorded {len(y)} test scores, expected {expected}")
        metrics = binary_metrics(y, p)
        return {"auc": metrics["roc_auc"], "accuracy": metrics["accuracy"], "images": float(len(y))}


def run_row(label: str, plan: Plan, recorder: _ScoreRecorder, *, expected: int | None) -> dict[str, float]:
    """Train one row's model(s) and score the union of the sites' held-out splits."""
    started = time.perf_counter()
    registry = recorder.registry()
    if label in ("pooled", "local"):
        run_baseline(plan, mode="pooled" if label == "pooled" else "local", registry=registry)
    else:
        simulate(plan, registry=registry)
    result = recorder.union_metrics(expected=expected)
    result["wall_s"] = time.perf_counter() - started
    return result


def tune(recorder: _ScoreRecorder, *, rounds: int) -> dict[str, dict[str, Any]]:
    """FedProx's ``proximal_mu``, by AUC on the official validation split."""
    mus = {
        mu: run_row(
            "FedProx",
            make_plan(rounds=rounds, norm=NORMS["FedProx"], validation=True,
                      strategy={"name": "fedprox", "proximal_mu": mu}),
            recorder,
            expected=None,
        )["auc"]
        for mu in PROXIMAL_MUS
    }  # fmt: skip
    mu = max(PROXIMAL_MUS, key=lambda v: mus[v])  # ties: the first (smallest)
    print(f"tuning: FedProx validation AUC by mu {mus}", file=sys.stderr, flush=True)
    return {"proximal_mu": {"value": mu, "validation_auc": {str(k): v for k, v in mus.items()}}}


def run(*, quick: bool) -> dict[str, Any]:
    """Every row, with tuning unless ``quick``; the JSON payload."""
    started = time.perf_counter()
    recorder = _ScoreRecorder()
    rounds = QUICK_ROUNDS if quick else ROUNDS
    tuning = {} if quick else tune(recorder, rounds=rounds)
    mu = tuning["proximal_mu"]["value"] if tuning else DEFAULT_PROXIMAL_MU
    strategies = QUICK_STRATEGIES if quick else tuple(STRATEGIES)
    rows: dict[str, dict[str, Any]] = {}
    for label in ("pooled", *(() if quick else ("local",)), *strategies):
        strategy: dict[str, Any] = {"name": STRATEGIES.get(label, "fedavg")}
        if strategy["name"] == "fedprox":
            strategy["proximal_mu"] = mu
        plan = make_plan(rounds=rounds, strategy=strategy, norm=NORMS[label])
        rows[label] = {**run_row(label, plan, recorder, expected=TEST_IMAGES), "norm": NORMS[label]}
        print(f"{label}: test AUC {rows[label]['auc']:.3f} in {rows[label]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    federated = list(strategies)
    best_auc = max(federated, key=lambda label: rows[label]["auc"])
    best_accuracy = max(federated, key=lambda label: rows[label]["accuracy"])
    wall_s = time.perf_counter() - started
    goals: dict[str, dict[str, Any]] = {
        "best federated auc": {"at_least": GOALS["auc"], "value": rows[best_auc]["auc"], "strategy": best_auc},
        "best federated accuracy": {
            "at_least": GOALS["accuracy"], "value": rows[best_accuracy]["accuracy"], "strategy": best_accuracy,
        },
        "wall time (s)": {"at_most": GOALS["wall_s"], "value": wall_s},
    }  # fmt: skip
    for goal in goals.values():
        goal["met"] = goal["value"] >= goal["at_least"] if "at_least" in goal else goal["value"] <= goal["at_most"]
    return {
        "description": "PneumoniaMNIST over 5 shifted sites: pooled, local, FedAvg, FedProx, FedBN (image-cnn)",
        "quick": quick,
        "seed": SEED,
        "rounds": rounds,
        "plan": make_plan(rounds=rounds).model_dump(mode="json"),
        "metric": "ROC AUC and accuracy (threshold 0.5) on the official test split (624 images, each scored at its site)",
        "rows": rows,
        "tuning": tuning,
        "goals": goals,
        "all_goals_met": all(goal["met"] for goal in goals.values()),
        "medmnist_reference": MEDMNIST_REFERENCE,
        "wall_s": wall_s,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
    }


def render(payload: dict[str, Any]) -> str:
    """The rows, the paper's reference and the goal checks."""
    table: list[list[Any]] = [
        [label, row["norm"], f"{row['auc']:.3f}", f"{row['accuracy']:.3f}", f"{row['wall_s']:.0f}"]
        for label, row in payload["rows"].items()
    ]
    for name, ref in payload["medmnist_reference"].items():
        table.append([f"MedMNIST v2 {name}", "batch", f"{ref['auc']:.3f}", f"{ref['accuracy']:.3f}", "-"])
    for name, goal in payload["goals"].items():
        bound = f">= {goal['at_least']:g}" if "at_least" in goal else f"<= {goal['at_most']:g}"
        where = f" ({goal['strategy']})" if "strategy" in goal else ""
        table.append([f"goal: {name} {bound}", "", f"{goal['value']:.3f}{where}", "pass" if goal["met"] else "FAIL", ""])
    return format_table(["", "norm", "test AUC", "test accuracy", "wall s"], table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pooled, FedAvg and FedBN, 10 rounds, no tuning")
    parser.add_argument("--out", type=Path, help="write the JSON here instead of benchmarks/results/imaging.json")
    args = parser.parse_args(argv)
    # One thread per model: the in-process nodes train two at a time on the 2 cores, and for this small
    # CNN a second thread per model was measured to gain nothing (pooled) or to cost 20% (federated).
    torch.set_num_threads(1)
    payload = run(quick=args.quick)
    print(f"PneumoniaMNIST, 5 shifted sites, image-cnn, {payload['rounds']} rounds, seed {payload['seed']}")
    print(render(payload))
    if payload["tuning"]:
        print(f"tuned on the validation split: FedProx mu {payload['tuning']['proximal_mu']['value']:g}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        path = args.out
    else:
        path = write_results("imaging", payload)
    print(f"wrote {path} in {payload['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
