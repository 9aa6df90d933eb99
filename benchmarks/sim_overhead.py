"""How much a simulated federation costs beyond the training itself: time and memory.

Two workloads, each in a fresh subprocess so that interpreter start, imports
and exit count, with the resident memory of the whole process tree polled
every 20 ms:

``overhead``
    10 nodes, a model of 11,000,000 float32 values (44 MB) and no training:
    each node returns the global weights plus small uniform noise. The task is
    a real :class:`fedcare.tasks.Task` (:class:`NoiseTask`) whose model is a
    numpy holder, registered in a :class:`fedcare.tasks.TaskRegistry` passed to
    :func:`fedcare.simulation.simulate`, so the run goes through the real
    Coordinator, Node, InProcTransport and FedAvg. 5 rounds, one evaluation at
    the end. Reported: seconds per round (from the ``round_end`` events'
    ``duration_s``), total process wall time and peak RSS. torch is never
    imported.
``tabular``
    Breast cancer over 10 nodes with federated normalization,
    ``tabular-logistic``, 20 rounds of 1 local epoch (batch 32, SGD lr 0.1),
    run as ``fedcare simulate PLAN --json`` (or through ``python -c`` calling
    :func:`fedcare.simulation.simulate` where the CLI is missing). Reported:
    process wall time and peak RSS.

The references are Flower 1.42's simulation engine on a 2-core machine: 38 s
and 2.4 GB for ``tabular``, about 2.5 s per round and 5 GB for ``overhead``.

Usage::

    .venv/bin/python benchmarks/sim_overhead.py            # both workloads, 3 repeats
    .venv/bin/python benchmarks/sim_overhead.py --repeat 1 --workload overhead

Results go to ``benchmarks/results/sim_overhead.json``. Seconds per round
are the mean over a run's rounds, round 1 included; times are the median
over repeats and peak RSS the largest seen over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedcare.data.catalog import BundledDataset, DatasetInfo
from fedcare.errors import ProtocolError
from fedcare.params import Parameters, ParameterSpec
from fedcare.plan import DatasetConfig, Plan
from fedcare.tasks.base import DataSpec, SiteData, Split, Task, TrainHook, TrainResult

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MB, format_table, machine_info, measure_process, median, write_results  # noqa: E402

__all__ = [
    "DEFAULT_SHAPES",
    "NoiseDataset",
    "NoiseModel",
    "NoiseTask",
    "add_uniform_noise",
    "overhead_plan",
    "run_overhead",
]

#: The ``overhead`` model: four tensors, 11,000,000 float32 values (44 MB) in all.
DEFAULT_SHAPES: ParameterSpec = (
    ("layer0.weight", (4000, 1500)),
    ("layer0.bias", (4000,)),
    ("layer1.weight", (1000, 4995)),
    ("layer1.bias", (1000,)),
)

_NOISE_CHUNK = 1 << 18  # noise is drawn 256 Ki values at a time, so the scratch stays in cache

#: Reference figures (Flower 1.42 simulation engine, 2 cores) and the goals as fractions of them.
REFERENCE = {
    "tabular": {"wall_s": 38.0, "peak_rss_bytes": 2.4e9},
    "overhead": {"s_per_round": 2.5, "peak_rss_bytes": 5.0e9},
}
GOALS = {
    "tabular": {"wall_s": 38.0 / 8, "peak_rss_bytes": 400 * MB},
    "overhead": {"s_per_round": 2.5 / 4, "peak_rss_bytes": 1000 * MB},
}

_ROOT = Path(__file__).resolve().parent.parent


# -- the noise task ----------------------------------------------------------------


class NoiseModel:
    """A numpy "model": weights kept as the vector they were last set from, plus pending noise.

    The vector is held by reference, never copied: the in-process transport
    hands every node the same read-only global parameters. Training only
    records the seed of the noise to add; :meth:`NoiseTask.get_parameters`
    draws it while writing the weights into a fresh vector, which is the copy
    the node turns into its update. So the task holds no model-sized buffer of
    its own between jobs, and a run measures the framework's copies.

    Parameters
    ----------
    spec : ParameterSpec
        ``(name, shape)`` of each tensor.
    base : numpy.ndarray
        1-D float32 vector with as many values as ``spec`` describes.
    """

    def __init__(self, spec: ParameterSpec, base: np.ndarray) -> None:
        self.spec = spec
        self.base = base
        self.noise_seeds: list[int] = []


class NoiseTask(Task):
    """A task that trains nothing: "training" adds uniform noise to the weights.

    It stands in for a real model of any size with the cost of local training
    taken out, so a run measures what the framework itself costs: moving,
    checking and averaging the parameters. The noise is drawn (in float32,
    with ``Generator.random``) when the weights are read back, inside the
    node's training job, so it counts in the round time. No torch is imported.

    Parameters
    ----------
    shapes : ParameterSpec
        Tensors of the model; by default 11,000,000 float32 values.
    noise_scale : float
        Each training run moves each weight by a value drawn uniformly from
        ``[-noise_scale, noise_scale)``.

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> plan = parse_plan({"task": "noise", "rounds": 1, "dataset": {"name": "noise"}})
    >>> task = NoiseTask(shapes=(("w", (2, 3)),), noise_scale=0.01)
    >>> model = task.build_model(DataSpec(num_features=1, num_classes=2), plan, seed=0)
    >>> before = task.get_parameters(model)
    >>> _ = task.train(model, Split(np.zeros((4, 1), np.float32), np.zeros(4, np.int64)), plan, seed=1)
    >>> after = task.get_parameters(model)
    >>> bool(0 < np.abs(after["w"] - before["w"]).max() <= 0.01)
    True
    """

    name = "noise"

    def __init__(self, *, shapes: ParameterSpec = DEFAULT_SHAPES, noise_scale: float = 1e-3) -> None:
        self.shapes = tuple((str(name), tuple(int(d) for d in shape)) for name, shape in shapes)
        self.noise_scale = float(noise_scale)

    @property
    def num_values(self) -> int:
        """Number of float32 values in the model."""
        return sum(int(np.prod(shape, dtype=np.int64)) for _, shape in self.shapes)

    def build_model(self, spec: DataSpec, plan: Plan, *, seed: int | None = None) -> NoiseModel:
        if seed is None:
            base = np.zeros(self.num_values, dtype=np.float32)  # replaced by set_parameters
        else:
            base = np.random.default_rng(seed).random(self.num_values, dtype=np.float32)
            base -= np.float32(0.5)
            base *= np.float32(0.1)
        return NoiseModel(self.shapes, base)

    def get_parameters(self, model: NoiseModel) -> Parameters:
        weights = np.empty_like(model.base)
        generators = [np.random.default_rng(seed) for seed in model.noise_seeds]
        scratch = np.empty(min(_NOISE_CHUNK, weights.size), dtype=np.float32)
        for start in range(0, weights.size, _NOISE_CHUNK):
            stop = min(start + _NOISE_CHUNK, weights.size)
            target = weights[start:stop]
            np.copyto(target, model.base[start:stop])
            for generator in generators:
                add_uniform_noise(target, scale=self.noise_scale, rng=generator, scratch=scratch)
        return Parameters.from_flat(weights, model.spec)

    def set_parameters(self, model: NoiseModel, parameters: Parameters) -> None:
        if parameters.spec != model.spec:
            raise ProtocolError(
                f"parameters have {len(parameters)} tensors of other shapes than the model's {len(model.spec)}"
            )
        flat = parameters.flatten()
        # Share a read-only vector (the transport's frozen global weights); copy a writeable one,
        # which its owner could still change.
        model.base = flat if not flat.flags.writeable else flat.copy()
        model.noise_seeds = []

    def train(
        self,
        model: NoiseModel,
        data: Split,
        plan: Plan,
        *,
        seed: int,
        hooks: Sequence[TrainHook] = (),
    ) -> TrainResult:
        model.noise_seeds.append(int(seed))
        return TrainResult(num_examples=len(data), steps=1, metrics={})

    def evaluate(self, model: NoiseModel, data: Split) -> dict[str, float]:
        return {"first_weight": float(model.base[0])}  # cheap: this benchmark is about the round trip


def add_uniform_noise(
    weights: np.ndarray, *, scale: float, rng: np.random.Generator, scratch: np.ndarray | None = None
) -> None:
    """``weights += U[-scale, scale)``, in place, drawn in float32 chunks.

    ``Generator.random`` with ``dtype=float32`` and ``out=`` is about five
    times faster than ``standard_normal``, and chunking keeps the scratch in
    cache and memory O(1).

    Parameters
    ----------
    weights : numpy.ndarray
        1-D contiguous float32 vector, changed in place.
    scale : float
        Half-width of the noise.
    rng : numpy.random.Generator
        Source of the noise; it advances by one draw per weight.
    scratch : numpy.ndarray, optional
        1-D float32 work space (any length); one is made when not given.
    """
    if scratch is None or scratch.size == 0:
        scratch = np.empty(min(_NOISE_CHUNK, weights.size), dtype=np.float32)
    chunk = scratch.size
    for start in range(0, weights.size, chunk):
        stop = min(start + chunk, weights.size)
        part = scratch[: stop - start]
        rng.random(dtype=np.float32, out=part)
        part -= np.float32(0.5)
        part *= np.float32(2 * scale)
        target = weights[start:stop]
        np.add(target, part, out=target)


class NoiseDataset(BundledDataset):
    """Placeholder sites for :class:`NoiseTask`: a few rows each, only their count matters.

    Site ``i`` holds ``10 + i`` rows, so FedAvg's weights differ between sites.
    """

    info = DatasetInfo(
        name="noise",
        description="placeholder rows for the noise benchmark task; no patient data",
        sites="num_nodes synthetic sites",
        patients=0,
        licence="n/a",
        source="synthetic",
    )
    _DEFAULT_NODES = 10

    def spec(self, config: DatasetConfig) -> DataSpec:
        return DataSpec(num_features=1, num_classes=2)

    def site_names(self, config: DatasetConfig) -> tuple[str, ...]:
        return tuple(f"site-{i}" for i in range(config.num_nodes or self._DEFAULT_NODES))

    def _load_all(self, config: DatasetConfig) -> dict[str, SiteData]:
        spec = self.spec(config)
        sites = {}
        for i, name in enumerate(self.site_names(config)):
            rows = 10 + i
            split = Split(x=np.zeros((rows, 1), dtype=np.float32), y=np.zeros(rows, dtype=np.int64))
            sites[name] = SiteData(site=name, spec=spec, train=split, test=split)
        return sites


def overhead_plan(*, num_nodes: int = 10, rounds: int = 5) -> Plan:
    """The ``overhead`` workload's plan: evaluation only after the last round."""
    from fedcare.plan import parse_plan

    return parse_plan(
        {
            "name": "bench-overhead",
            "task": NoiseTask.name,
            "rounds": rounds,
            "dataset": {"name": NoiseDataset.info.name, "num_nodes": num_nodes, "normalization": "none"},
            "evaluation": {"every_rounds": rounds},
            "seed": 0,
        }
    )


def run_overhead(
    *, num_nodes: int = 10, rounds: int = 5, shapes: ParameterSpec = DEFAULT_SHAPES, noise_scale: float = 1e-3
) -> dict[str, Any]:
    """Run the ``overhead`` federation in this process and describe it.

    Returns
    -------
    dict
        ``round_s`` (each round's ``duration_s``), ``run_wall_s``,
        ``rounds_completed``, ``max_abs_change`` (largest change of a weight
        over the run), ``num_values`` and ``torch_imported``.
    """
    from fedcare.data.catalog import DatasetCatalog
    from fedcare.simulation import simulate
    from fedcare.tasks.registry import TaskRegistry

    plan = overhead_plan(num_nodes=num_nodes, rounds=rounds)
    registry = TaskRegistry([(NoiseTask.name, lambda: NoiseTask(shapes=shapes, noise_scale=noise_scale))])
    catalog = DatasetCatalog([NoiseDataset()])
    round_s: list[float] = []

    def on_event(event: Mapping[str, Any]) -> None:
        if event["event"] == "round_end":
            round_s.append(float(event["duration_s"]))

    result = simulate(plan, registry=registry, catalog=catalog, on_event=on_event)
    task = registry.get(NoiseTask.name)
    difference = task.build_model(NoiseDataset().spec(plan.dataset), plan, seed=plan.seed).base
    np.subtract(result.parameters.flatten(), difference, out=difference)  # in place: no 44 MB temporaries
    change = float(np.abs(difference, out=difference).max())
    return {
        "round_s": round_s,
        "run_wall_s": result.wall_s,
        "rounds_completed": result.rounds_completed,
        "failures": result.failures,
        "max_abs_change": change,
        "num_values": result.parameters.num_elements,
        "torch_imported": "torch" in sys.modules,
        "sklearn_imported": "sklearn" in sys.modules,
    }


# -- the driver --------------------------------------------------------------------


_TABULAR_PLAN = {
    "name": "bench-tabular",
    "task": "tabular-logistic",
    "rounds": 20,
    "dataset": {"name": "breast-cancer", "num_nodes": 10, "normalization": "federated"},
    "local": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "learning_rate": 0.1},
    "seed": 0,
}

_TABULAR_PYTHON = """\
import json, sys
from fedcare.plan import parse_plan
from fedcare.simulation import simulate
result = simulate(parse_plan(json.loads(sys.argv[1])))
print(json.dumps({"rounds": result.rounds_completed, "wall_s": result.wall_s,
                  "pooled": result.final_evaluation.pooled}))
"""


def _cli_path() -> Path | None:
    """The ``fedcare`` console script beside this interpreter, if it has ``simulate --json``."""
    import subprocess

    script = Path(sys.executable).parent / "fedcare"
    if not script.exists():
        return None
    probe = subprocess.run([str(script), "simulate", "--help"], capture_output=True, text=True, env=_child_env())
    return script if probe.returncode == 0 and "--json" in probe.stdout else None


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    env["COLUMNS"] = "200"
    return env


def _tabular_once(workdir: Path, cli: Path | None) -> tuple[Any, dict[str, Any], str]:
    if cli is not None:
        import yaml

        plan_path = workdir / "tabular.yaml"
        plan_path.write_text(yaml.safe_dump(_TABULAR_PLAN, sort_keys=False), encoding="utf-8")
        run_dir = workdir / f"run-{time.time_ns()}"
        command = [str(cli), "simulate", str(plan_path), "--json", "--out", str(run_dir)]
        launcher = "fedcare simulate PLAN --json"
    else:
        command = [sys.executable, "-c", _TABULAR_PYTHON, json.dumps(_TABULAR_PLAN)]
        launcher = "python -c simulate(...)"
    measurement = measure_process(command, cwd=workdir, env=_child_env())
    if measurement.returncode != 0:
        raise RuntimeError(f"tabular run failed (exit {measurement.returncode}): {measurement.stderr[-2000:]}")
    return measurement, measurement.last_json_line(), launcher


def _overhead_once(workdir: Path) -> tuple[Any, dict[str, Any]]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "overhead"]
    measurement = measure_process(command, cwd=workdir, env=_child_env())
    if measurement.returncode != 0:
        raise RuntimeError(f"overhead run failed (exit {measurement.returncode}): {measurement.stderr[-2000:]}")
    return measurement, measurement.last_json_line()


def _ratio(value: float, reference: float) -> str:
    return f"1/{reference / value:.1f}" if value > 0 else "-"


def run_benchmark(*, workloads: Sequence[str], repeat: int) -> dict[str, Any]:
    """Run the chosen workloads ``repeat`` times each and return the JSON payload."""
    payload: dict[str, Any] = {"benchmark": "sim_overhead", "machine": machine_info(), "repeat": repeat, "workloads": {}}
    with tempfile.TemporaryDirectory(prefix="fedcare-bench-") as tmp:
        workdir = Path(tmp)
        if "tabular" in workloads:
            cli = _cli_path()
            runs = []
            launcher = ""
            for _ in range(repeat):
                measurement, answer, launcher = _tabular_once(workdir, cli)
                runs.append({"wall_s": measurement.wall_s, "peak_rss_bytes": measurement.peak_rss_bytes,
                             "polls": measurement.polls, "in_process_wall_s": answer.get("wall_s"),
                             "pooled_accuracy": (answer.get("pooled") or {}).get("accuracy")})
            payload["workloads"]["tabular"] = {
                "launcher": launcher,
                "plan": _TABULAR_PLAN,
                "runs": runs,
                "wall_s": median([r["wall_s"] for r in runs]),
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            }
        if "overhead" in workloads:
            runs = []
            for _ in range(repeat):
                measurement, answer = _overhead_once(workdir)
                if answer["torch_imported"]:
                    raise RuntimeError("the overhead workload imported torch; it must not")
                runs.append({"wall_s": measurement.wall_s, "peak_rss_bytes": measurement.peak_rss_bytes,
                             "polls": measurement.polls, **answer})
            payload["workloads"]["overhead"] = {
                "nodes": 10,
                "rounds": len(runs[0]["round_s"]),
                "num_values": runs[0]["num_values"],
                "runs": runs,
                "s_per_round": median([sum(r["round_s"]) / len(r["round_s"]) for r in runs]),
                "run_wall_s": median([r["run_wall_s"] for r in runs]),
                "wall_s": median([r["wall_s"] for r in runs]),
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            }
    payload["table"] = _table_rows(payload["workloads"])
    payload["all_goals_met"] = all(row["goal_met"] for row in payload["table"] if row["goal_met"] is not None)
    return payload


def _table_rows(workloads: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(workload: str, metric: str, value: float, unit: str, goal: float | None, reference: float | None) -> None:
        rows.append(
            {
                "workload": workload,
                "metric": metric,
                "value": value,
                "unit": unit,
                "goal": goal,
                "reference": reference,
                "ratio_to_reference": (value / reference) if reference else None,
                "goal_met": (value <= goal) if goal is not None else None,
            }
        )

    if "tabular" in workloads:
        t = workloads["tabular"]
        add("tabular", "wall time (process)", t["wall_s"], "s", GOALS["tabular"]["wall_s"], REFERENCE["tabular"]["wall_s"])
        add("tabular", "peak RSS (tree)", t["peak_rss_bytes"], "B", GOALS["tabular"]["peak_rss_bytes"],
            REFERENCE["tabular"]["peak_rss_bytes"])
    if "overhead" in workloads:
        o = workloads["overhead"]
        add("overhead", "time per round (mean of 5)", o["s_per_round"], "s", GOALS["overhead"]["s_per_round"],
            REFERENCE["overhead"]["s_per_round"])
        add("overhead", "run time (5 rounds + eval)", o["run_wall_s"], "s", None, None)
        add("overhead", "wall time (process)", o["wall_s"], "s", None, None)
        add("overhead", "peak RSS (tree)", o["peak_rss_bytes"], "B", GOALS["overhead"]["peak_rss_bytes"],
            REFERENCE["overhead"]["peak_rss_bytes"])
    return rows


def _render(rows: Sequence[Mapping[str, Any]]) -> str:
    def show(value: float | None, unit: str) -> str:
        if value is None:
            return "-"
        return f"{value / MB:.0f} MB" if unit == "B" else f"{value:.3f} s"

    table = []
    for row in rows:
        unit = row["unit"]
        table.append(
            [
                row["workload"],
                row["metric"],
                show(row["value"], unit),
                show(row["reference"], unit),
                _ratio(row["value"], row["reference"]) if row["reference"] else "-",
                ("<= " + show(row["goal"], unit)) if row["goal"] is not None else "-",
                {True: "yes", False: "NO", None: "-"}[row["goal_met"]],
            ]
        )
    return format_table(["workload", "metric", "value", "Flower 1.42", "ratio", "goal", "goal met"], table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["tabular", "overhead"], action="append",
                        help="run only this workload (repeatable); default both")
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload (median time, max memory)")
    parser.add_argument("--worker", choices=["overhead"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "overhead":
        print(json.dumps(run_overhead()))
        return 0
    workloads = args.workload or ["tabular", "overhead"]
    started = time.perf_counter()
    payload = run_benchmark(workloads=workloads, repeat=max(1, args.repeat))
    payload["benchmark_wall_s"] = time.perf_counter() - started
    payload["load_average_1m_after"] = os.getloadavg()[0]
    path = write_results("sim_overhead", payload)
    print(_render(payload["table"]))
    if "overhead" in payload["workloads"]:
        o = payload["workloads"]["overhead"]
        per_run = ", ".join(" ".join(f"{s:.3f}" for s in r["round_s"]) for r in o["runs"])
        print(f"\noverhead rounds (s): {per_run}")
    if "tabular" in payload["workloads"]:
        print(f"tabular launcher: {payload['workloads']['tabular']['launcher']}")
    print(f"ratio = value / Flower 1.42 reference; times are medians of {payload['repeat']} runs, "
          f"memory the largest; 1 MB = 10^6 bytes")
    print(f"load average (1 min) before/after: {payload['machine']['load_average_1m']:.2f}/"
          f"{payload['load_average_1m_after']:.2f} on {payload['machine']['cpu_count']} cores "
          "(other work on the machine slows the timings)")
    print(f"results: {path.relative_to(_ROOT) if path.is_relative_to(_ROOT) else path}")
    return 0 if payload["all_goals_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
