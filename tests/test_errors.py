"""The exception tree: every error is a FedcareError and the matching builtin."""

from __future__ import annotations

import pytest

import fedcare
from fedcare import errors
from fedcare.errors import (
    BudgetExceeded,
    ConfigError,
    DataError,
    FedcareError,
    FederationError,
    PolicyViolation,
    ProtocolError,
    TransportError,
)


@pytest.mark.parametrize(
    ("error_class", "builtin"),
    [
        (ConfigError, ValueError),
        (DataError, ValueError),
        (ProtocolError, ValueError),
        (TransportError, ConnectionError),
        (PolicyViolation, PermissionError),
        (BudgetExceeded, PermissionError),
        (FederationError, RuntimeError),
    ],
)
def test_each_error_can_be_caught_as_its_builtin(error_class: type, builtin: type) -> None:
    with pytest.raises(builtin):
        raise error_class("boom")


@pytest.mark.parametrize(
    "error_class",
    [ConfigError, DataError, ProtocolError, TransportError, PolicyViolation, BudgetExceeded, FederationError],
)
def test_each_error_can_be_caught_as_fedcare_error(error_class: type) -> None:
    with pytest.raises(FedcareError):
        raise error_class("boom")


def test_budget_exceeded_is_a_policy_violation() -> None:
    with pytest.raises(PolicyViolation):
        raise BudgetExceeded("would spend epsilon 3.0 of 2.0")


def test_config_error_is_not_a_runtime_error() -> None:
    assert not issubclass(ConfigError, RuntimeError)


def test_fedcare_error_is_not_a_value_error() -> None:
    # Only the subclasses pick a builtin; the root must not make every error a ValueError.
    assert not issubclass(FedcareError, ValueError)


def test_error_carries_node_round_and_field_as_attributes() -> None:
    err = ProtocolError("update has the wrong shape", node_id="site-1", round=3, field="update")

    assert (err.node_id, err.round, err.field, err.message) == (
        "site-1",
        3,
        "update",
        "update has the wrong shape",
    )


def test_error_context_defaults_to_none() -> None:
    err = DataError("no rows")

    assert (err.node_id, err.round, err.field) == (None, None, None)


def test_error_message_is_prefixed_with_field_path() -> None:
    err = ConfigError("must be > 0, got -0.1", field="plan.local.learning_rate")

    assert str(err) == "plan.local.learning_rate: must be > 0, got -0.1"


def test_error_message_is_prefixed_with_node_and_round() -> None:
    err = TransportError("timed out after 30 s", node_id="hungary", round=2)

    assert str(err) == "[node 'hungary', round 2] timed out after 30 s"


def test_error_message_without_context_is_the_bare_message() -> None:
    assert str(FederationError("too few nodes")) == "too few nodes"


def test_error_message_names_round_zero() -> None:
    # round 0 is falsy but still a round: it must not be dropped from the message.
    assert str(FederationError("no update", round=0)) == "[round 0] no update"


def test_every_public_error_is_reexported_from_the_package() -> None:
    missing = [name for name in errors.__all__ if getattr(fedcare, name, None) is not getattr(errors, name)]

    assert missing == []
