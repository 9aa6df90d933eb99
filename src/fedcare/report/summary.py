"""The plan in plain words, and what left the sites."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedcare.report._values import as_mapping

__all__ = ["data_leaving_sites", "plan_summary"]


#: The strategy options that matter for each strategy, in the order the summary gives them.
_STRATEGY_OPTIONS: dict[str, tuple[str, ...]] = {
    "fedavg": ("server_learning_rate",),
    "median": ("server_learning_rate",),
    "trimmed-mean": ("trim_fraction",),
    "krum": ("byzantine_nodes", "krum_selected"),
    "geometric-median": ("geometric_median_iterations",),
    "norm-bounding": ("max_norm",),
    "fedprox": ("proximal_mu",),
    "fedadam": ("server_learning_rate", "beta1", "beta2", "tau"),
    "fedyogi": ("server_learning_rate", "beta1", "beta2", "tau"),
    "fedadagrad": ("server_learning_rate", "beta1", "tau"),
    "scaffold": ("server_learning_rate",),
    "cyclic": (),
    "fedbn": ("server_learning_rate",),
    "fednova": ("server_learning_rate",),
    "ditto": ("ditto_lambda",),
}


def _words(option: str) -> str:
    return option.replace("_", " ")


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "default" if value is None else str(value)


def _compression(compression: Mapping[str, Any]) -> str:
    """The plan's update compression in words; empty when updates go uncompressed."""
    method = str(compression.get("method", "none"))
    if method in ("float16", "bfloat16"):
        return f"{method}: each update cast to 16 bits (half the bytes)"
    if method == "int8":
        return "int8: 8-bit stochastic quantization with one scale per tensor (about a quarter of the bytes)"
    if method == "topk":
        fraction = float(compression.get("topk_fraction", 0.01))
        feedback = "with" if compression.get("error_feedback", True) else "without"
        return f"top-k: the {100 * fraction:.4g}% largest coordinates of each update, {feedback} error feedback"
    return ""


def plan_summary(plan: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The plan in plain words, as (label, sentence) pairs.

    Parameters
    ----------
    plan : mapping
        The validated plan as a mapping (``plan.yaml``).

    Returns
    -------
    tuple of (str, str)

    Examples
    --------
    >>> summary = dict(plan_summary({"task": "tabular-logistic", "rounds": 5, "dataset": {"name": "heart-disease"},
    ...                              "strategy": {"name": "fedprox", "proximal_mu": 0.01}}))
    >>> summary["strategy"]
    'fedprox (proximal mu 0.01)'
    >>> summary["secure aggregation"]
    "off: the coordinator sees each site's update"
    >>> dict(plan_summary({"compression": {"method": "topk", "topk_fraction": 0.01, "error_feedback": True}}))["compression"]
    'top-k: the 1% largest coordinates of each update, with error feedback'
    """
    dataset = as_mapping(plan.get("dataset"))
    local = as_mapping(plan.get("local"))
    strategy = as_mapping(plan.get("strategy"))
    evaluation = as_mapping(plan.get("evaluation"))
    secure = as_mapping(plan.get("secure_aggregation"))
    privacy = as_mapping(plan.get("privacy"))
    record_level = as_mapping(privacy.get("record_level"))
    site_level = as_mapping(privacy.get("site_level"))
    lines: list[tuple[str, str]] = []
    lines.append(("task", str(plan.get("task", "unknown"))))
    data = str(dataset.get("name", "unknown"))
    details = []
    if dataset.get("normalization"):
        details.append(f"{dataset['normalization']} normalization")
    if dataset.get("num_nodes"):
        details.append(f"split into {dataset['num_nodes']} sites ({dataset.get('partition', 'iid')})")
    lines.append(("dataset", data + (f" ({', '.join(details)})" if details else "")))
    name = str(strategy.get("name", "fedavg"))
    options = [f"{_words(o)} {_value(strategy[o])}" for o in _STRATEGY_OPTIONS.get(name, ()) if o in strategy]
    lines.append(("strategy", name + (f" ({', '.join(options)})" if options else "")))
    every = evaluation.get("every_rounds", 1)
    rounds = f"{plan.get('rounds', '?')} rounds, evaluated " + ("every round" if every == 1 else f"every {every} rounds")
    lines.append(("rounds", rounds))
    if local:
        lines.append((
            "local training",
            f"{_value(local.get('epochs'))} epoch(s) per round, batch size {_value(local.get('batch_size'))}, "
            f"{local.get('optimizer', 'sgd')} with learning rate {_value(local.get('learning_rate'))}",
        ))  # fmt: skip
    per_round = plan.get("nodes_per_round")
    nodes = plan.get("nodes")
    who = f"{per_round} site(s) per round" if per_round else "every site every round"
    if isinstance(nodes, list):
        who += f" of {len(nodes)} admitted"
    lines.append(("sites per round", f"{who}; at least {plan.get('min_nodes', 1)} must answer"))
    if secure.get("enabled"):
        lines.append((
            "secure aggregation",
            f"on (SecAgg+): the coordinator sees only the sum of the updates; each coordinate clipped to "
            f"{_value(secure.get('clip'))}",
        ))  # fmt: skip
    else:
        lines.append(("secure aggregation", "off: the coordinator sees each site's update"))
    compression = _compression(as_mapping(plan.get("compression")))
    if compression:
        lines.append(("compression", compression))
    if record_level.get("enabled"):
        noise = record_level.get("noise_multiplier")
        lines.append((
            "record-level DP",
            f"on (DP-SGD at every site): epsilon {_value(record_level.get('epsilon'))} per site for the whole run, "
            f"delta {_value(record_level.get('delta'))}, per-example gradient clip {_value(record_level.get('max_grad_norm'))} "
            f"(L2), {record_level.get('accountant', 'pld')} accountant"
            + (f", noise multiplier {_value(noise)}" if noise is not None else ""),
        ))  # fmt: skip
    else:
        lines.append(("record-level DP", "off"))
    if site_level.get("enabled"):
        lines.append((
            "site-level DP",
            f"on ({site_level.get('mode', 'central')}): each update clipped to {_value(site_level.get('clip_norm'))} (L2), "
            f"noise multiplier {_value(site_level.get('noise_multiplier'))}, delta {_value(site_level.get('delta'))}"
            + (", adaptive clipping" if site_level.get("adaptive_clipping") else ""),
        ))  # fmt: skip
    else:
        lines.append(("site-level DP", "off"))
    return tuple(lines)


def data_leaving_sites(plan: Mapping[str, Any], privacy: Mapping[str, Any] | None) -> str:
    """What left the sites, in plain words: the model card's statement, else derived from the plan.

    Parameters
    ----------
    plan : mapping
        The validated plan as a mapping; may be empty.
    privacy : mapping, optional
        The model card's ``privacy`` block.

    Returns
    -------
    str
        Empty when neither says anything.

    Examples
    --------
    >>> data_leaving_sites({"secure_aggregation": {"enabled": False}}, None)
    'model updates, metrics, example counts'
    """
    stated = as_mapping(privacy).get("data_leaving_sites")
    if isinstance(stated, str) and stated:
        return stated
    if not plan:
        return ""
    secure = bool(as_mapping(plan.get("secure_aggregation")).get("enabled"))
    text = "masked model updates (only their sum is revealed), evaluation metrics" if secure else (
        "model updates, metrics, example counts"
    )
    if as_mapping(plan.get("dataset")).get("normalization") == "federated":
        text += ", per-feature counts, sums and sums of squares"
    return text
