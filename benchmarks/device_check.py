"""Device check: train a small imaging model with ``device: auto`` and time each round.

A site's machine check before it joins, and the GPU check for the torch
tasks' device handling: PneumoniaMNIST divided into ``--sites`` sites
(a multiple of 5, default 5), ``image-cnn`` (``--width`` 8, GroupNorm, so DP-SGD can run
too), FedAvg, ``--rounds`` rounds of ``--steps`` local steps (batches of 64). Every site is a real
:class:`~fedcare.federation.node.Node` built with
``compute: {device: DEVICE}``, in this one process; the CPU threads are set
once, as ``fedcare node`` sets them
(:func:`~fedcare.tasks.compute.configure_threads`). With ``--dp`` the sites
train with record-level DP-SGD (Opacus) on the device.

Printed: the device resolved, torch's threads, each round's seconds (the
first includes CUDA's warm-up), the mean of the others, and the final mean
test accuracy; with ``--compare-cpu``, also the largest difference between
the device's and the CPU's model after one round (float32 rounding, not 0,
on a GPU; without ``--dp``, whose noise the device's generator draws). It runs anywhere torch does: without CUDA, ``auto`` is the CPU.

Usage::

    .venv/bin/python benchmarks/device_check.py                    # device: auto
    .venv/bin/python benchmarks/device_check.py --device cuda --dp --compare-cpu
    .venv/bin/python benchmarks/device_check.py --device cpu --threads 2 --rounds 2

Results go to ``benchmarks/results/device_check.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_results

__all__ = ["check_plan_for", "run_check"]


def check_plan_for(*, sites: int, rounds: int, steps: int, width: int, dp: bool) -> Any:
    """The check's plan: image-cnn on PneumoniaMNIST over ``sites`` sites."""
    from fedcare.plan import parse_plan

    spec: dict[str, Any] = {
        "name": "device-check",
        "task": "image-cnn",
        "dataset": {"name": "pneumonia", "num_nodes": sites, "normalization": "none"},
        "model": {"width": width, "norm": "group"},
        "rounds": rounds,
        "min_nodes": 1,
        "local": {"steps": steps, "batch_size": 64, "optimizer": "sgd", "learning_rate": 0.1},
        "seed": 0,
    }
    if dp:
        spec["privacy"] = {"record_level": {"enabled": True, "epsilon": 50.0, "noise_multiplier": 0.5, "accountant": "rdp"}}
    return parse_plan(spec)


def _federate(plan: Any, sites: dict[str, Any], *, device: str, ledger_dir: Path | None, rounds: int) -> tuple[Any, list[float], Any]:
    """``rounds`` FedAvg rounds of real nodes on ``device``; the model, seconds per round and the nodes."""
    from fedcare.federation.node import Node
    from fedcare.messages import Job, JobKind
    from fedcare.plan import plan_hash
    from fedcare.simulation import initial_parameters
    from fedcare.strategies import make_strategy
    from fedcare.tasks.compute import ComputeSettings
    from fedcare.tasks.registry import TaskRegistry

    registry = TaskRegistry.from_entry_points()
    compute = ComputeSettings(device=device)
    nodes = {
        site: Node(site, task=registry.get(plan.task), data=data, plan=plan, compute=compute, secure_noise=False,
                   ledger_dir=None if ledger_dir is None else ledger_dir / site)  # fmt: skip
        for site, data in sites.items()
    }
    strategy = make_strategy(plan.strategy, num_sampled=len(nodes), num_nodes=len(nodes))
    spec = next(iter(sites.values())).spec
    parameters = initial_parameters(registry.get(plan.task), spec, plan).freeze()
    digest = plan_hash(plan)
    seconds: list[float] = []
    for round_number in range(1, rounds + 1):
        started = time.perf_counter()
        strategy.begin_round(round_number, parameters)
        for index, (site, node) in enumerate(nodes.items()):
            job = Job("device-check", round_number, f"{round_number}-{site}", JobKind.TRAIN, plan_hash=digest,
                      parameters=parameters, config={"seed": 1000 * round_number + index})  # fmt: skip
            answer = node.handle(job)
            if not answer.ok or answer.update is None:
                raise SystemExit(f"{site} failed round {round_number}: {answer.error}")
            strategy.receive_data(answer.data, node_id=site)
            strategy.accumulate(answer.update, weight=answer.num_examples, node_id=site)
        parameters = strategy.finalize().freeze()
        seconds.append(time.perf_counter() - started)
    return parameters, seconds, nodes


def run_check(
    *, device: str, threads: int | None, sites: int, rounds: int, steps: int, width: int, dp: bool, compare_cpu: bool
) -> dict[str, Any]:
    """Run the check and describe it."""
    import numpy as np
    import torch

    from fedcare.data import DatasetCatalog
    from fedcare.tasks.compute import ComputeSettings, configure_threads, resolve_device

    settings = ComputeSettings(device=device, threads=threads)
    resolved = resolve_device(settings)
    configured = configure_threads(settings, device=resolved)
    plan = check_plan_for(sites=sites, rounds=rounds, steps=steps, width=width, dp=dp)
    data = DatasetCatalog.bundled().get(plan.dataset.name).load_sites(plan.dataset)
    with tempfile.TemporaryDirectory() as ledgers:
        ledger_dir = Path(ledgers) if dp else None
        parameters, seconds, nodes = _federate(plan, data, device=device, ledger_dir=ledger_dir, rounds=rounds)
        accuracies = []
        for node in nodes.values():
            model = node._model_with(parameters)  # the final global model, on the device
            metrics = node.task.evaluate(model, node._data.test)
            if "accuracy" in metrics:
                accuracies.append(metrics["accuracy"])
        difference = None
        if compare_cpu:
            one, _, _ = _federate(plan, data, device=device, ledger_dir=None if ledger_dir is None else ledger_dir / "a", rounds=1)
            cpu, _, _ = _federate(plan, data, device="cpu", ledger_dir=None if ledger_dir is None else ledger_dir / "b", rounds=1)
            difference = float(np.abs(one.flatten() - cpu.flatten()).max())
    return {
        "device_asked": device,
        "device": resolved,
        "cuda_name": torch.cuda.get_device_name(resolved) if resolved.startswith("cuda") else None,
        "threads_set": configured,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sites": sites,
        "local_steps": steps,
        "dp_sgd": dp,
        "parameters": int(parameters.num_elements),
        "seconds_per_round": seconds,
        "mean_seconds_per_round_after_first": float(np.mean(seconds[1:])) if len(seconds) > 1 else seconds[0],
        "mean_test_accuracy": float(np.mean(accuracies)) if accuracies else None,
        "max_abs_difference_from_cpu_after_one_round": difference,
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the usable cores)")
    parser.add_argument("--sites", type=int, default=5, help="a multiple of 5 (default 5: the five scanners)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="local optimizer steps per round (default 20)")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--dp", action="store_true", help="train with record-level DP-SGD (Opacus)")
    parser.add_argument("--compare-cpu", action="store_true", help="also train one round on the CPU and compare")
    args = parser.parse_args(argv)
    result = run_check(device=args.device, threads=args.threads, sites=args.sites, rounds=args.rounds, steps=args.steps,
                       width=args.width, dp=args.dp, compare_cpu=args.compare_cpu)  # fmt: skip
    path = write_results("device_check", result)
    rounds = ", ".join(f"{s:.2f}" for s in result["seconds_per_round"])
    print(f"device: {result['device']} ({result['cuda_name'] or 'CPU'}), torch threads: {result['torch_threads']}")
    print(f"seconds per round: {rounds} (mean after the first: {result['mean_seconds_per_round_after_first']:.2f})")
    print(f"mean test accuracy: {result['mean_test_accuracy']}, DP-SGD: {result['dp_sgd']}")
    if result["max_abs_difference_from_cpu_after_one_round"] is not None:
        print(f"largest difference from the CPU's model after one round: {result['max_abs_difference_from_cpu_after_one_round']:.3g}")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
