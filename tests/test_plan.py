"""The plan: validation errors name the field and the value received."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedcare.errors import ConfigError
from fedcare.plan import Plan, load_plan, parse_plan, plan_hash

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "heart_disease.yaml"


def _plan(**overrides: Any) -> dict[str, Any]:
    return {"task": "tabular-logistic", "dataset": {"name": "heart-disease"}, "rounds": 3, **overrides}


def _error(data: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_plan(data)
    return caught.value


# --- the example ----------------------------------------------------------------------


def test_example_heart_disease_plan_loads() -> None:
    plan = load_plan(EXAMPLE)

    assert isinstance(plan, Plan)
    assert (plan.dataset.name, plan.rounds, plan.min_nodes) == ("heart-disease", 30, 2)


def test_example_plan_keeps_its_local_recipe() -> None:
    plan = load_plan(EXAMPLE)

    assert (plan.local.batch_size, plan.local.learning_rate, plan.evaluation.every_rounds) == (32, 0.01, 1)


def test_minimal_plan_gets_defaults() -> None:
    plan = parse_plan(_plan())

    assert (plan.strategy.name, plan.local.epochs, plan.local.steps) == ("fedavg", 1, None)


# --- field errors ---------------------------------------------------------------------


def test_config_error_is_a_value_error() -> None:
    assert isinstance(_error(_plan(rounds=0)), ValueError)


def test_negative_learning_rate_error_names_its_field() -> None:
    assert _error(_plan(local={"learning_rate": -0.25})).field == "plan.local.learning_rate"


def test_negative_learning_rate_error_shows_the_value_received() -> None:
    assert "-0.25" in str(_error(_plan(local={"learning_rate": -0.25})))


def test_zero_rounds_error_names_its_field() -> None:
    assert _error(_plan(rounds=0)).field == "plan.rounds"


def test_zero_rounds_error_shows_the_value_received() -> None:
    assert "got 0" in _error(_plan(rounds=0)).message


def test_unknown_strategy_error_names_its_field() -> None:
    assert _error(_plan(strategy={"name": "fedmagic"})).field == "plan.strategy.name"


def test_unknown_strategy_error_shows_the_value_received() -> None:
    assert "'fedmagic'" in _error(_plan(strategy={"name": "fedmagic"})).message


def test_unknown_top_level_key_is_refused_with_its_path() -> None:
    assert _error(_plan(learning_rte=0.1)).field == "plan.learning_rte"


def test_unknown_top_level_key_error_shows_the_value_received() -> None:
    assert "0.125" in _error(_plan(learning_rte=0.125)).message


def test_unknown_nested_key_is_refused_with_its_path() -> None:
    assert _error(_plan(local={"learning_rte": 0.1})).field == "plan.local.learning_rte"


def test_min_nodes_above_nodes_per_round_is_refused() -> None:
    with pytest.raises(ConfigError):
        parse_plan(_plan(min_nodes=5, nodes_per_round=2))


def test_min_nodes_error_shows_both_values_received() -> None:
    message = _error(_plan(min_nodes=5, nodes_per_round=2)).message

    assert "min_nodes (5)" in message and "nodes_per_round (2)" in message


def test_min_nodes_error_names_the_min_nodes_field() -> None:
    assert _error(_plan(min_nodes=5, nodes_per_round=2)).field == "plan.min_nodes"


def test_min_nodes_equal_to_nodes_per_round_is_accepted() -> None:
    assert parse_plan(_plan(min_nodes=2, nodes_per_round=2)).min_nodes == 2


def test_both_epochs_and_steps_are_refused_under_plan_local() -> None:
    assert str(_error(_plan(local={"epochs": 2, "steps": 10})).field).startswith("plan.local")


def test_both_epochs_and_steps_error_shows_the_values_received() -> None:
    message = _error(_plan(local={"epochs": 2, "steps": 10})).message

    assert "2" in message and "10" in message


def test_neither_epochs_nor_steps_is_refused() -> None:
    assert str(_error(_plan(local={"epochs": None})).field).startswith("plan.local")


def test_steps_alone_replace_the_default_epochs() -> None:
    local = parse_plan(_plan(local={"steps": 10})).local

    assert (local.epochs, local.steps) == (None, 10)


def test_duplicate_node_is_refused() -> None:
    with pytest.raises(ConfigError, match="twice"):
        parse_plan(_plan(nodes=["cleveland", "cleveland"]))


def test_missing_required_field_is_named() -> None:
    data = _plan()
    del data["task"]

    assert _error(data).field == "plan.task"


def test_plan_that_is_not_a_mapping_is_refused() -> None:
    assert _error(["rounds", 3]).field == "plan"


def test_every_problem_is_reported_when_several_fields_are_wrong() -> None:
    message = _error(_plan(rounds=0, local={"learning_rate": -1})).message

    assert "plan.rounds" in message and "plan.local.learning_rate" in message


def test_every_field_is_named_once_when_several_fields_are_wrong() -> None:
    err = _error(_plan(rounds=0, local={"learning_rate": -1}))

    assert str(err).count("plan.rounds") == 1


def test_parse_plan_does_not_change_the_mapping_it_is_given() -> None:
    data = _plan(local={"steps": 10})

    parse_plan(data)

    assert data["local"] == {"steps": 10}


# --- files ----------------------------------------------------------------------------


def test_missing_plan_file_gives_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_plan(tmp_path / "absent.yaml")


def test_missing_plan_file_error_does_not_show_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_plan(tmp_path / "patient-1234.yaml")

    assert "patient-1234" not in str(caught.value)


def test_invalid_yaml_gives_config_error(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("task: [unclosed\nrounds: 3\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="not valid YAML"):
        load_plan(path)


def test_empty_plan_file_gives_config_error(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("", encoding="utf-8")

    with pytest.raises(ConfigError):
        load_plan(path)


def test_yaml_file_with_a_bad_value_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(EXAMPLE.read_text(encoding="utf-8").replace("rounds: 30", "rounds: 0"), encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_plan(path)

    assert caught.value.field == "plan.rounds"


# --- hash -----------------------------------------------------------------------------


def test_plan_hash_is_a_sha256_hex_digest() -> None:
    digest = plan_hash(parse_plan(_plan()))

    assert len(digest) == 64 and set(digest) <= set("0123456789abcdef")


def test_plan_hash_is_stable_across_parses() -> None:
    assert plan_hash(parse_plan(_plan())) == plan_hash(parse_plan(_plan()))


def test_plan_hash_does_not_depend_on_key_order() -> None:
    forward = _plan(seed=1, min_nodes=2)
    backward = dict(reversed(list(forward.items())))

    assert plan_hash(parse_plan(forward)) == plan_hash(parse_plan(backward))


def test_plan_hash_of_the_example_is_stable_across_loads() -> None:
    assert plan_hash(load_plan(EXAMPLE)) == plan_hash(load_plan(EXAMPLE))


@pytest.mark.parametrize(
    "change",
    [
        {"rounds": 4},
        {"seed": 1},
        {"local": {"learning_rate": 0.2}},
        {"dataset": {"name": "breast-cancer"}},
        {"strategy": {"server_learning_rate": 0.5}},
    ],
    ids=["rounds", "seed", "learning_rate", "dataset", "server_learning_rate"],
)
def test_plan_hash_changes_when_a_field_changes(change: dict[str, Any]) -> None:
    assert plan_hash(parse_plan(_plan(**change))) != plan_hash(parse_plan(_plan()))


def test_plan_is_immutable() -> None:
    plan = parse_plan(_plan())

    with pytest.raises(ValueError):
        plan.rounds = 5
