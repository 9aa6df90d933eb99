"""The benchmark's noise task and helpers, and the import hygiene the benchmark relies on."""

from __future__ import annotations

import doctest
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from fedcare.federation.node import Node
from fedcare.messages import Job, JobKind
from fedcare.params import Parameters
from fedcare.plan import plan_hash
from fedcare.tasks.base import DataSpec, Split

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
TINY = (("w", (4, 3)), ("b", (5,)))
SCALE = 0.01


def _load(name: str) -> ModuleType:
    if name in sys.modules:  # sim_overhead imports _common itself
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("sim_overhead")


@pytest.fixture(scope="module")
def common() -> ModuleType:
    return _load("_common")


def _run_python(code: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_default_noise_model_has_eleven_million_float32_values(bench):
    assert bench.NoiseTask().num_values == 11_000_000


def test_noise_run_through_the_coordinator_moves_weights_by_small_noise(bench):
    result = bench.run_overhead(num_nodes=3, rounds=2, shapes=TINY, noise_scale=SCALE)
    assert result["rounds_completed"] == 2
    assert result["failures"] == []
    assert len(result["round_s"]) == 2
    assert result["num_values"] == 17
    assert 0 < result["max_abs_change"] <= 2 * SCALE


def test_node_returns_an_update_of_the_model_shape_within_the_noise_scale(bench):
    plan = bench.overhead_plan(num_nodes=3, rounds=2)
    task = bench.NoiseTask(shapes=TINY, noise_scale=SCALE)
    site = bench.NoiseDataset().load_site(plan.dataset, "site-1")
    global_parameters = task.get_parameters(task.build_model(site.spec, plan, seed=0)).freeze()
    node = Node("site-1", task=task, data=site, plan=plan)
    job = Job("run", 1, "j1", JobKind.TRAIN, plan_hash=plan_hash(plan), parameters=global_parameters, config={"seed": 7})

    answer = node.handle(job)

    assert answer.ok, answer.error
    assert answer.update is not None and answer.update.spec == global_parameters.spec
    delta = answer.update.flatten()
    assert np.all(np.abs(delta) <= SCALE) and np.any(delta != 0)
    assert answer.num_examples == 11


def test_noise_task_draws_the_same_noise_for_the_same_seed(bench):
    plan = bench.overhead_plan(num_nodes=1, rounds=1)
    task = bench.NoiseTask(shapes=TINY, noise_scale=SCALE)
    data = Split(np.zeros((2, 1), np.float32), np.zeros(2, np.int64))
    spec = DataSpec(num_features=1, num_classes=2)
    first, second = task.build_model(spec, plan, seed=0), task.build_model(spec, plan, seed=0)
    task.train(first, data, plan, seed=3)
    task.train(second, data, plan, seed=3)
    np.testing.assert_array_equal(task.get_parameters(first).flatten(), task.get_parameters(second).flatten())


def test_noise_task_copies_writeable_parameters_it_is_given(bench):
    plan = bench.overhead_plan(num_nodes=1, rounds=1)
    task = bench.NoiseTask(shapes=TINY)
    model = task.build_model(DataSpec(num_features=1, num_classes=2), plan)
    incoming = Parameters.from_flat(np.ones(17, dtype=np.float32), TINY)
    task.set_parameters(model, incoming)
    incoming.flatten()[:] = 5.0
    assert float(task.get_parameters(model).flatten().max()) == 1.0


def test_noise_task_and_helpers_doctests_pass(bench, common):
    for module in (bench, common):
        failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert failures == 0, module.__name__


def test_importing_fedcare_and_simulation_does_not_import_torch_or_sklearn():
    loaded = _run_python(
        """
        import json, sys
        import fedcare
        import fedcare.simulation
        print(json.dumps(sorted(m for m in ("torch", "sklearn", "scipy") if m in sys.modules)))
        """
    )
    assert loaded == []


def test_noise_benchmark_run_never_imports_torch():
    result = _run_python(
        f"""
        import json, sys
        sys.path.insert(0, {str(BENCHMARKS)!r})
        import sim_overhead
        result = sim_overhead.run_overhead(num_nodes=3, rounds=2, shapes={TINY!r})
        print(json.dumps(result))
        """
    )
    assert result["rounds_completed"] == 2
    assert result["torch_imported"] is False
    assert result["sklearn_imported"] is False


def test_measure_process_sums_memory_of_child_processes(common):
    parent = textwrap.dedent(
        """
        import subprocess, sys
        child = "import time; block = bytearray(150_000_000); block[::4096] = b'x' * len(block[::4096]); time.sleep(0.5)"
        subprocess.run([sys.executable, "-c", child], check=True)
        """
    )
    measurement = common.measure_process([sys.executable, "-c", parent])
    assert measurement.returncode == 0, measurement.stderr
    assert measurement.peak_rss_bytes >= 150_000_000
    assert measurement.wall_s >= 0.5
