"""Built-in tasks for tabular data: logistic regression and a small MLP."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedcare.plan import Plan
from fedcare.tasks.base import DataSpec
from fedcare.tasks.torch_task import TorchClassificationTask, dropout

if TYPE_CHECKING:
    import torch

__all__ = ["LogisticTask", "MLPTask"]


def _outputs(spec: DataSpec) -> int:
    return 1 if spec.num_classes == 2 else spec.num_classes


class LogisticTask(TorchClassificationTask):
    """Logistic regression (softmax regression for more than two classes).

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> plan = parse_plan({"task": "tabular-logistic", "dataset": {"name": "x"}, "rounds": 1})
    >>> task = LogisticTask()
    >>> model = task.build_model(DataSpec(num_features=13, num_classes=2), plan, seed=0)
    >>> task.get_parameters(model).spec
    (('linear.weight', (1, 13)), ('linear.bias', (1,)))
    """

    name = "tabular-logistic"

    def make_module(self, spec: DataSpec, plan: Plan) -> torch.nn.Module:
        import torch

        module = torch.nn.Module()
        module.linear = torch.nn.Linear(spec.num_features, _outputs(spec))
        module.forward = module.linear.__call__  # through __call__, so hooks on the layer (Opacus) run
        return module


class MLPTask(TorchClassificationTask):
    """A one-hidden-layer perceptron with ReLU; width from ``plan.model.hidden_units``.

    With ``plan.model.batch_norm`` a ``BatchNorm1d`` follows the hidden layer;
    its running mean and variance are floating buffers, so they travel with the
    parameters (and stay local under ``fedbn``).

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> plan = parse_plan({"task": "tabular-mlp", "dataset": {"name": "x"}, "rounds": 1,
    ...                    "model": {"hidden_units": 8}})
    >>> model = MLPTask().build_model(DataSpec(num_features=13, num_classes=2), plan, seed=0)
    >>> [shape for _, shape in MLPTask().get_parameters(model).spec]
    [(8, 13), (8,), (1, 8), (1,)]
    """

    name = "tabular-mlp"

    def make_module(self, spec: DataSpec, plan: Plan) -> torch.nn.Module:
        import torch

        layers: list[torch.nn.Module] = [
            torch.nn.Linear(spec.num_features, plan.model.hidden_units),
        ]
        if plan.model.batch_norm:
            layers.append(torch.nn.BatchNorm1d(plan.model.hidden_units))
        layers.append(torch.nn.ReLU())
        if plan.model.dropout > 0:
            layers.append(dropout(plan.model.dropout))
        layers.append(torch.nn.Linear(plan.model.hidden_units, _outputs(spec)))
        return torch.nn.Sequential(*layers)
