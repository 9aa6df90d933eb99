"""Membership inference audit: overfit models are caught, weak ones are not, results are sound."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.data.catalog import DatasetCatalog
from fedcare.errors import ConfigError, DataError
from fedcare.plan import parse_plan
from fedcare.privacy.audit import (
    AUDIT_FILENAME,
    PrivacyAudit,
    attack_result,
    audit_run,
    lira_scores,
    logit_confidence,
)
from fedcare.simulation import simulate

SHADOWS = 8

# Two hospitals, a wide MLP, 200 local epochs in all with Adam: memorizes its training records.
OVERFIT_PLAN = {
    "name": "overfit",
    "task": "tabular-mlp",
    "dataset": {"name": "heart-disease"},
    "nodes": ["cleveland", "hungary"],
    "rounds": 10,
    "model": {"hidden_units": 256},
    "local": {"epochs": 20, "optimizer": "adam", "learning_rate": 0.01, "batch_size": 32},
    "evaluation": {"every_rounds": 10},
    "seed": 0,
}

# One epoch of logistic regression at a tiny learning rate: barely moves from its initial weights.
# Stands in for a DP-trained model until record-level DP-SGD can be audited the same way.
WEAK_PLAN = {
    "name": "weak",
    "task": "tabular-logistic",
    "dataset": {"name": "heart-disease"},
    "rounds": 1,
    "local": {"epochs": 1, "learning_rate": 0.001},
    "seed": 0,
}


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PrivacyAudit]:
    run = tmp_path_factory.mktemp("overfit") / "run"
    simulate(parse_plan(OVERFIT_PLAN), out_dir=run)
    return run, audit_run(run, shadow_models=SHADOWS, seed=0)


# The overfit recipe trained with record-level DP-SGD at epsilon 1 per hospital.
DP_PLAN = {
    **OVERFIT_PLAN,
    "name": "overfit-with-dp",
    "privacy": {"record_level": {"enabled": True, "epsilon": 1.0, "delta": 1e-3}},
}


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PrivacyAudit]:
    run = tmp_path_factory.mktemp("dp") / "run"
    simulate(parse_plan(DP_PLAN), out_dir=run)
    return run, audit_run(run, shadow_models=SHADOWS, seed=0)


@pytest.fixture(scope="module")
def weak_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PrivacyAudit]:
    run = tmp_path_factory.mktemp("weak") / "run"
    simulate(parse_plan(WEAK_PLAN), out_dir=run)
    return run, audit_run(run, shadow_models=SHADOWS, seed=0)


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / AUDIT_FILENAME).unlink(missing_ok=True)
    return copy


# -- what the attacks find --------------------------------------------------------------


def test_overfit_model_is_detected_by_loss_threshold_attack(overfit_run):
    _, audit = overfit_run
    assert audit.mean_auc()["loss_threshold"] >= 0.55  # measured 0.60


def test_overfit_model_is_detected_by_lira(overfit_run):
    _, audit = overfit_run
    assert audit.mean_auc()["lira"] >= 0.62  # measured 0.71


def test_lira_is_stronger_than_loss_threshold_on_overfit_model(overfit_run):
    _, audit = overfit_run
    means = audit.mean_auc()
    assert means["lira"] >= means["loss_threshold"] + 0.03  # measured +0.11


def test_dp_trained_model_leaks_about_chance_where_the_same_recipe_without_dp_is_caught(overfit_run, dp_run):
    _, overfit = overfit_run
    _, private = dp_run
    for attack, auc in private.mean_auc().items():
        assert abs(auc - 0.5) <= 0.06, attack
    assert private.mean_auc()["lira"] <= overfit.mean_auc()["lira"] - 0.1


def test_weak_model_leaks_no_more_than_chance(weak_run):
    _, audit = weak_run
    for attack, auc in audit.mean_auc().items():
        assert abs(auc - 0.5) <= 0.1, attack  # measured 0.50 and 0.54


# -- the result ---------------------------------------------------------------------------


def test_member_counts_equal_split_sizes(weak_run):
    _, audit = weak_run
    plan = parse_plan(WEAK_PLAN)
    sites = DatasetCatalog.bundled().get("heart-disease").load_sites(plan.dataset)
    assert sorted(audit.sites) == sorted(sites)
    for name, site in audit.sites.items():
        assert (site.members, site.non_members) == (len(sites[name].train), len(sites[name].test))


def test_result_fields_are_in_range(overfit_run):
    _, audit = overfit_run
    for site in audit.sites.values():
        assert site.rounds_trained == OVERFIT_PLAN["rounds"]
        for result in (site.loss_threshold, site.lira):
            assert 0.0 <= result.auc <= 1.0
            assert 0.0 <= result.tpr_at_0_1pct_fpr <= result.tpr_at_1pct_fpr <= 1.0
            assert result.min_fpr == pytest.approx(1 / site.non_members)


def test_audit_writes_privacy_audit_json(weak_run):
    run, audit = weak_run
    written = json.loads((run / AUDIT_FILENAME).read_text())
    assert written == json.loads(json.dumps(audit.to_dict()))
    assert set(written["sites"]["cleveland"]) >= {"members", "non_members", "loss_threshold", "lira"}


def test_audit_recomputes_federated_normalization_when_the_run_did_not_record_it(weak_run, tmp_path):
    run = copy_run(weak_run[0], tmp_path)
    checkpoint = run / "checkpoints" / "latest.json"
    state = json.loads(checkpoint.read_text())
    state.pop("normalization", None)
    checkpoint.write_text(json.dumps(state))
    audit = audit_run(run, shadow_models=SHADOWS, seed=0)
    assert audit.normalization == "recomputed"
    # The recomputed statistics are the coordinator's: the attacks see the same features.
    for name, site in audit.sites.items():
        assert site.loss_threshold.auc == pytest.approx(weak_run[1].sites[name].loss_threshold.auc)


def test_audit_is_reproducible_with_seed(weak_run, tmp_path):
    run, audit = weak_run
    again = audit_run(copy_run(run, tmp_path), shadow_models=SHADOWS, seed=0)
    assert {**again.to_dict(), "wall_s": 0} == {**audit.to_dict(), "wall_s": 0}


def test_audit_uses_normalization_the_run_recorded(weak_run, tmp_path):
    run = copy_run(weak_run[0], tmp_path)
    checkpoint = run / "checkpoints" / "latest.json"
    state = json.loads(checkpoint.read_text())
    state["normalization"] = {"mean": [0.0] * 13, "scale": [1.0] * 13}
    checkpoint.write_text(json.dumps(state))
    assert audit_run(run, shadow_models=2).normalization == "recorded"


# -- refusals ---------------------------------------------------------------------------------


def test_run_without_model_is_refused_naming_the_file(weak_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(weak_run[0] / "plan.yaml", run / "plan.yaml")
    with pytest.raises(DataError, match=r"model\.safetensors.*fedcare simulate") as caught:
        audit_run(run)
    assert "plan.yaml" not in caught.value.message


def test_empty_directory_is_refused_naming_plan_and_model(tmp_path):
    with pytest.raises(DataError, match=r"plan\.yaml and no model\.safetensors"):
        audit_run(tmp_path)


def test_one_shadow_model_is_refused_naming_the_argument(weak_run):
    with pytest.raises(ConfigError, match="got 1") as caught:
        audit_run(weak_run[0], shadow_models=1)
    assert caught.value.field == "shadow_models"


def test_sites_with_other_data_than_the_run_are_refused(weak_run, tmp_path):
    run = copy_run(weak_run[0], tmp_path)
    card = json.loads((run / "model_card.json").read_text())
    card["train_examples"]["cleveland"] += 1
    (run / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(DataError, match="audit with the data the run used") as caught:
        audit_run(run, shadow_models=2)
    assert caught.value.node_id == "cleveland"


# -- the kernels ------------------------------------------------------------------------------


def test_logit_confidence_stays_finite_for_saturated_predictions():
    phi, loss = logit_confidence(np.array([[0.0, 800.0], [800.0, 0.0]]), np.array([1, 1]))
    assert phi.tolist() == [800.0, -800.0]
    assert loss.tolist() == [0.0, 800.0]


def test_lira_scores_refuse_a_record_no_shadow_left_out():
    with pytest.raises(ConfigError, match="at least one IN and one OUT"):
        lira_scores(np.zeros(2), np.zeros((2, 2)), np.array([[True, True], [True, False]]), per_example_variance=False)


def test_tpr_below_resolution_is_read_at_the_smallest_achievable_fpr():
    # 10 non-members: the smallest non-zero FPR is 0.1; 3 of 5 members score above every non-member.
    scores = np.array([9.0, 8.0, 7.0, 0.5, 0.2] + [0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.1, 0.05, 0.02, 0.01])
    member = np.arange(15) < 5
    result = attack_result(scores, member)
    assert result.min_fpr == pytest.approx(0.1)
    assert result.tpr_at_1pct_fpr == result.tpr_at_0_1pct_fpr == pytest.approx(3 / 5)


def test_tpr_is_interpolated_between_roc_points():
    # 200 non-members; three of them tie with the second member, so the ROC curve steps
    # from (FPR 0, TPR 0.5) straight to (FPR 0.015, TPR 1.0).
    non_members = np.concatenate([[100.0] * 3, np.linspace(0.0, 1.0, 197)])
    scores = np.concatenate([[1000.0, 100.0], non_members])
    result = attack_result(scores, np.arange(202) < 2)
    assert result.min_fpr == pytest.approx(0.005)
    assert result.tpr_at_1pct_fpr == pytest.approx(0.5 + 0.5 * 0.01 / 0.015)
    assert result.tpr_at_0_1pct_fpr == pytest.approx(0.5 + 0.5 * 0.005 / 0.015)  # read at min_fpr


# -- the command ------------------------------------------------------------------------------


def test_cli_json_prints_per_site_aucs(weak_run, tmp_path):
    run = copy_run(weak_run[0], tmp_path)
    out = CliRunner().invoke(app, ["audit-privacy", str(run), "--shadow-models", "2", "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout)
    assert payload["shadow_models"] == 2
    assert set(payload["sites"]) == {"cleveland", "hungary", "switzerland", "va-long-beach"}
    for site in payload["sites"].values():
        assert 0.0 <= site["loss_threshold"]["auc"] <= 1.0
        assert 0.0 <= site["lira"]["auc"] <= 1.0


def test_cli_prints_a_row_per_site(weak_run, tmp_path, console_columns):
    run = copy_run(weak_run[0], tmp_path)
    console_columns(160)
    out = CliRunner().invoke(app, ["audit-privacy", str(run), "--shadow-models", "2"])
    assert out.exit_code == 0, out.output
    for row in ("cleveland", "hungary", "switzerland", "va-long-beach", "mean of sites", "LiRA AUC"):
        assert row in out.stdout


def test_cli_run_without_model_exits_3(tmp_path):
    out = CliRunner().invoke(app, ["audit-privacy", str(tmp_path), "--json"])
    assert out.exit_code == 3
    assert "fedcare simulate" in out.stderr
    assert out.stdout == ""
