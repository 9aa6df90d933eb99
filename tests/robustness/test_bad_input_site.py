"""Bad input at a site: jobs, plans and files, each refused with a specific error and without effect.

A real node of the heart-disease federation (Cleveland) is sent jobs a
correct coordinator would not send. Each is answered with an error that
names the problem, logged, and leaves the node as it was: a correct job
afterwards gives bit for bit the update a fresh node gives, and a refused job
spends no privacy budget.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcare.data.catalog import DatasetCatalog
from fedcare.data.readers import DicomReader, NpzReader
from fedcare.errors import ConfigError
from fedcare.federation import Node
from fedcare.messages import Job, JobKind
from fedcare.params import Parameters
from fedcare.plan import Plan, parse_plan, plan_hash
from fedcare.simulation import initial_parameters
from fedcare.tasks.tabular import LogisticTask

BASE: dict[str, Any] = {
    "task": "tabular-logistic",
    "dataset": {"name": "heart-disease", "normalization": "per-site"},
    "rounds": 3,
    "local": {"epochs": 1, "batch_size": 16},
}
PLAN = parse_plan(BASE)
# With DP-SGD the noise is drawn afresh (not reproducible by design): checked by the epsilon spent.
PRIVATE = parse_plan({**BASE, "privacy": {"record_level": {"enabled": True, "epsilon": 2.0, "delta": 1e-3, "max_grad_norm": 1.0}}})
CATALOG = DatasetCatalog.bundled()
INITIAL = initial_parameters(LogisticTask(), CATALOG.spec(PLAN.dataset), PLAN).freeze()


def make_node(tmp_path: Path, plan: Plan = PLAN) -> Node:
    data = CATALOG.get("heart-disease").load_site(plan.dataset, "cleveland")
    return Node("cleveland", task=LogisticTask(), data=data, plan=plan, ledger_dir=tmp_path / "ledger", state_dir=tmp_path / "state")


def job(plan: Plan = PLAN, **changes: Any) -> Job:
    base = Job("run-1", 1, "job-1", JobKind.TRAIN, plan_hash=plan_hash(PLAN), parameters=INITIAL, config={"seed": 7})
    return replace(base, **changes, **({"plan_hash": plan_hash(plan)} if "plan_hash" not in changes else {}))


def with_values(value: float) -> Parameters:
    flat = INITIAL.flatten().copy()
    flat[3] = value
    return Parameters.from_flat(flat, INITIAL.spec).freeze()


JOB_CASES: list[tuple[str, Job, str]] = [
    ("made for another plan", job(plan_hash="0" * 64), "different plan"),
    ("training job without parameters", job(parameters=None), "must carry the global parameters"),
    ("evaluation job without parameters", job(kind=JobKind.EVALUATE, parameters=None), "must carry the global parameters"),
    ("parameters of another model", job(parameters=Parameters({"linear.weight": np.ones((3, 3), np.float32), "linear.bias": np.ones(1, np.float32)})), "the model expects"),
    ("NaN in the global parameters", job(parameters=with_values(float("nan"))), "non-finite"),
    ("Inf in the global parameters", job(parameters=with_values(float("inf"))), "non-finite"),
    ("a seed that is not an integer", job(config={"seed": "7; rm -rf /"}), "seed must be an integer"),
    ("unknown secure aggregation phase", job(kind=JobKind.SECAGG, parameters=None, config={"secagg_phase": "steal"}), "unknown secure aggregation phase"),
]


@pytest.mark.parametrize(("name", "bad", "message"), JOB_CASES, ids=[c[0] for c in JOB_CASES])
def test_bad_job_is_answered_with_its_error_and_changes_nothing(
    name: str, bad: Job, message: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node(tmp_path / "node")
    with caplog.at_level(logging.WARNING, logger="fedcare.federation.node"):
        answer = node.handle(bad)
    fresh = make_node(tmp_path / "fresh")

    assert answer.error is not None and message in answer.error, answer.error
    assert answer.update is None
    assert caplog.records, "the refusal was not logged"
    after, expected = node.handle(job(job_id="job-2")), fresh.handle(job(job_id="job-2"))
    assert after.error is None and expected.error is None
    assert after.update is not None and expected.update is not None
    np.testing.assert_array_equal(after.update.flatten(), expected.update.flatten())


@pytest.mark.parametrize(("name", "bad", "message"), JOB_CASES[1:], ids=[c[0] for c in JOB_CASES[1:]])
def test_a_refused_job_spends_no_privacy_budget(name: str, bad: Job, message: str, tmp_path: Path) -> None:
    node, fresh = make_node(tmp_path / "node", PRIVATE), make_node(tmp_path / "fresh", PRIVATE)
    answer = node.handle(replace(bad, plan_hash=plan_hash(PRIVATE)))

    assert answer.error is not None and message in answer.error
    after, expected = node.handle(job(PRIVATE, job_id="job-2")), fresh.handle(job(PRIVATE, job_id="job-2"))
    assert after.error is None, after.error
    assert after.metrics["dp_epsilon"] == pytest.approx(expected.metrics["dp_epsilon"], rel=1e-12)
    assert after.metrics["dp_epsilon"] > 0


# ---------------------------------------------------------------- plans

VALID: dict[str, Any] = {"task": "tabular-logistic", "dataset": {"name": "heart-disease"}, "rounds": 3}

PLAN_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown top-level key", {**VALID, "roundz": 3}, "roundz"),
    ("zero rounds", {**VALID, "rounds": 0}, "rounds"),
    ("rounds not a number", {**VALID, "rounds": "many"}, "rounds"),
    ("unknown strategy", {**VALID, "strategy": {"name": "fedmagic"}}, "strategy.name"),
    ("negative learning rate", {**VALID, "local": {"learning_rate": -0.1}}, "local.learning_rate"),
    ("epsilon of zero", {**VALID, "privacy": {"record_level": {"enabled": True, "epsilon": 0, "delta": 1e-3}}}, "epsilon"),
    ("delta of one", {**VALID, "privacy": {"record_level": {"enabled": True, "epsilon": 1, "delta": 1.0}}}, "delta"),
    ("batch size of zero", {**VALID, "local": {"batch_size": 0}}, "local.batch_size"),
    ("a negative update-norm bound", {**VALID, "max_update_norm": -1}, "max_update_norm"),
    ("the same node admitted twice", {**VALID, "nodes": ["a", "a"]}, "nodes"),
]


@pytest.mark.parametrize(("name", "raw", "field"), PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_invalid_plan_field_is_named(name: str, raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_plan(raw)

    assert field in str(refused.value), str(refused.value)


def test_invalid_plan_leaves_a_valid_one_untouched() -> None:
    before = parse_plan(VALID)
    with pytest.raises(ConfigError):
        parse_plan({**VALID, "rounds": -1})

    assert plan_hash(parse_plan(VALID)) == plan_hash(before)
    assert isinstance(before, Plan)


# ---------------------------------------------------------------- files


def test_dicom_without_pixel_data_is_skipped_and_counted_by_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pydicom.data import get_testdata_file

    for name in ("rtplan.dcm", "CT_small.dcm"):
        shutil.copy(get_testdata_file(name), tmp_path / name)
    with caplog.at_level(logging.INFO):
        records, report = DicomReader().read(tmp_path)

    assert len(records) == 1
    assert dict(report.skipped) == {"no pixel data": 1}
    assert "rtplan" not in caplog.text  # counts are logged, never file names


def test_npz_holding_pickled_objects_is_refused_without_unpickling(tmp_path: Path) -> None:
    archive = tmp_path / "site.npz"
    np.savez(archive, images=np.array([{"payload": "x"}], dtype=object), labels=np.array([0]))

    with pytest.raises(Exception) as refused:
        NpzReader(images="images", labels="labels").read(archive)

    assert "pickle" in str(refused.value).lower() or "object" in str(refused.value).lower()
