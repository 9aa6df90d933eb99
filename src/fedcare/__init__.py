"""fedcare: federated learning for healthcare.

Hospitals train one model together while every patient record stays where it
is; only model updates and numbers travel.
"""

__version__ = "0.1.0"

from fedcare.errors import (  # noqa: E402
    BudgetExceeded,
    ConfigError,
    DataError,
    FedcareError,
    FederationError,
    PolicyViolation,
    ProtocolError,
    SecAggAborted,
    TransportError,
)
from fedcare.params import Parameters  # noqa: E402
from fedcare.plan import Plan, load_plan, parse_plan  # noqa: E402

__all__ = [
    "BudgetExceeded",
    "ConfigError",
    "DataError",
    "FedcareError",
    "FederationError",
    "Parameters",
    "Plan",
    "PolicyViolation",
    "ProtocolError",
    "SecAggAborted",
    "TransportError",
    "__version__",
    "load_plan",
    "parse_plan",
]
