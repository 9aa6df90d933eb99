"""Buffered asynchronous aggregation (FedBuff) against synchronous FedAvg, with one site five times slower.

Heart disease (the bundled four hospitals, FLamby's split), the canonical plan
(``src/fedcare/plans/heart_disease.yaml``: logistic regression, 30 rounds,
2 local epochs, SGD lr 0.01, batch 32, federated normalization) without secure
aggregation, which buffered rounds cannot use. In-process nodes, one compute
slot per site. Each local round sleeps 20 ms after training at three sites;
at the slow one (a site with little compute) the round takes five times as
long as that in all (training included), so the slow site really is 5x slower
whatever the machine's load.

Synchronous: FedAvg waits for all four sites every round. Buffered:
``buffer_size: 3``, ``max_staleness: 8``, ``staleness_exponent: 0.5``; a
round is one aggregation, so both runs make 30 global models. Reported per
slow site and plan seed: the coordinator's wall time (``RunResult.wall_s``),
the ratio buffered / synchronous, and the final mean over sites of test
accuracy and ROC AUC (the run's own evaluation). A one-round warm-up run
comes first, so neither timed run pays the process's one-off costs.

Usage::

    .venv/bin/python benchmarks/buffered.py                        # 4 slow sites x 3 seeds (about a minute)
    .venv/bin/python benchmarks/buffered.py --slow va-long-beach --seeds 0 --out /tmp/buffered.json

Results go to ``benchmarks/results/buffered.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
for _path in (_HERE, _ROOT / "tests" / "federation"):
    if str(_path) not in sys.path:  # run as a script or loaded by path
        sys.path.insert(0, str(_path))
from _common import format_table, machine_info, write_results  # noqa: E402
from slow_sites import HEART as _HEART, run_heart  # noqa: E402

from fedcare.plan import parse_plan  # noqa: E402

SITES = ("cleveland", "hungary", "switzerland", "va-long-beach")

#: The plan of tests/federation/slow_sites.py under the benchmark's own name.
HEART: dict[str, Any] = {**_HEART, "name": "heart-buffered-benchmark"}

BUFFERED = {"buffer_size": 3, "max_staleness": 8, "staleness_exponent": 0.5}


def compare(
    slow: str, seed: int, *, rounds: int, delay_s: float, slowdown: float, buffered: Mapping[str, Any]
) -> dict[str, Any]:
    base = {**HEART, "rounds": rounds, "seed": seed}
    out: dict[str, Any] = {"slow_site": slow, "seed": seed}
    for name, plan in (("synchronous", base), ("buffered", {**base, "strategy": {"name": "fedavg", "buffered": dict(buffered)}})):
        result, events = run_heart(parse_plan(plan), delay_s=delay_s, slowdowns={slow: slowdown})
        final = result.final_evaluation
        assert final is not None
        ends = [e for e in events if e["event"] == "round_end"]
        out[name] = {
            "wall_s": result.wall_s,
            "accuracy": final.mean["accuracy"],
            "roc_auc": final.mean["roc_auc"],
            "rounds": result.rounds_completed,
        }
        if name == "buffered":
            slow_used = [e["buffered"]["staleness"][slow] for e in ends if slow in e["buffered"]["staleness"]]
            out[name]["slow_site_updates_used"] = len(slow_used)
            out[name]["slow_site_mean_staleness"] = statistics.fmean(slow_used) if slow_used else None
            out[name]["dropped_stale"] = sum(e["buffered"]["dropped_stale"] for e in ends)
    out["wall_ratio"] = out["buffered"]["wall_s"] / out["synchronous"]["wall_s"]
    out["accuracy_difference"] = out["buffered"]["accuracy"] - out["synchronous"]["accuracy"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", nargs="+", default=list(SITES), choices=SITES, help="the site made slow (each in turn)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--delay-s", type=float, default=0.02, help="sleep per local round at the other sites, seconds")
    parser.add_argument("--slowdown", type=float, default=5.0, help="how many times longer the slow site's round takes")
    parser.add_argument("--buffer-size", type=int, default=BUFFERED["buffer_size"])
    parser.add_argument("--max-staleness", type=int, default=BUFFERED["max_staleness"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    buffered = {**BUFFERED, "buffer_size": args.buffer_size, "max_staleness": args.max_staleness}
    started = time.perf_counter()
    run_heart(parse_plan({**HEART, "rounds": 1}))  # warm-up: imports and first-use costs
    results = [
        compare(slow, seed, rounds=args.rounds, delay_s=args.delay_s, slowdown=args.slowdown, buffered=buffered)
        for slow in args.slow
        for seed in args.seeds
    ]
    rows = [
        [
            r["slow_site"],
            r["seed"],
            f"{r['synchronous']['wall_s']:.2f}",
            f"{r['buffered']['wall_s']:.2f}",
            f"{r['wall_ratio']:.2f}",
            f"{r['synchronous']['accuracy']:.3f}",
            f"{r['buffered']['accuracy']:.3f}",
            f"{r['synchronous']['roc_auc']:.3f}",
            f"{r['buffered']['roc_auc']:.3f}",
            r["buffered"]["slow_site_updates_used"],
        ]
        for r in results
    ]
    headers = ["slow site", "seed", "sync s", "buffered s", "ratio", "sync acc", "buf acc", "sync AUC", "buf AUC", "slow used"]
    print(format_table(headers, rows))
    summary = {
        "wall_ratio_mean": statistics.fmean(r["wall_ratio"] for r in results),
        "wall_ratio_max": max(r["wall_ratio"] for r in results),
        "accuracy_difference_mean": statistics.fmean(r["accuracy_difference"] for r in results),
        "accuracy_difference_min": min(r["accuracy_difference"] for r in results),
        "accuracy_difference_max": max(r["accuracy_difference"] for r in results),
    }
    print(
        f"ratio mean {summary['wall_ratio_mean']:.2f} (max {summary['wall_ratio_max']:.2f}); accuracy difference "
        f"mean {summary['accuracy_difference_mean']:+.3f} (from {summary['accuracy_difference_min']:+.3f} "
        f"to {summary['accuracy_difference_max']:+.3f})"
    )
    total_s = time.perf_counter() - started
    print(f"total {total_s:.1f} s")
    payload = {
        "benchmark": "buffered",
        "dataset": "heart-disease",
        "plan": HEART | {"rounds": args.rounds},
        "buffered": buffered,
        "delay_s": args.delay_s,
        "slowdown": args.slowdown,
        "metric": "mean over sites of test accuracy and ROC AUC after the last round; coordinator wall time",
        "results": results,
        "summary": summary,
        "total_s": total_s,
        "machine": machine_info(),
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        path = args.out
    else:
        path = write_results("buffered", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
