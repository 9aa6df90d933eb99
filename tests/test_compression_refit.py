"""Top-k's dense refit: the tensors sent whole are retrained on the model as the coordinator will see it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fedcare.compression import decompress, topk_dense_mask
from fedcare.data.catalog import DatasetCatalog
from fedcare.errors import ConfigError
from fedcare.federation import Node
from fedcare.messages import Job, JobKind
from fedcare.params import Parameters
from fedcare.plan import CompressionConfig, parse_plan, plan_hash
from fedcare.simulation import initial_parameters
from fedcare.tasks.hooks import trainable_only
from fedcare.tasks.tabular import MLPTask

FRACTION = 0.1  # of the MLP's 961 values: k = 97, so its 64 + 64 + 1 head and bias values go whole


def mlp_plan(**compression: Any) -> Any:
    return parse_plan(
        {
            "task": "tabular-mlp",
            "model": {"hidden_units": 64},
            "rounds": 3,
            "dataset": {"name": "heart-disease", "normalization": "per-site"},
            "local": {"epochs": 2, "batch_size": 32, "optimizer": "sgd", "learning_rate": 0.05, "momentum": 0.9},
            "compression": {"method": "topk", "topk_fraction": FRACTION, **compression},
        }
    )


def train(node: Node, plan: Any, parameters: Parameters, *, round_number: int = 1) -> Parameters:
    job = Job("run", round_number, f"j{round_number}", JobKind.TRAIN, plan_hash=plan_hash(plan), parameters=parameters,
              config={"seed": 7})  # fmt: skip
    result = node.handle(job)
    assert result.ok, result.error
    return decompress(result.update, parameters.spec, method="topk", topk_fraction=FRACTION)


@pytest.fixture(scope="module")
def site() -> Any:
    plan = mlp_plan()
    data = DatasetCatalog.bundled().get("heart-disease").load_site(plan.dataset, "hungary")
    parameters = initial_parameters(MLPTask(), data.spec, plan).freeze()
    return data, parameters


def make_node(site: Any, plan: Any) -> Node:
    return Node("hungary", task=MLPTask(), data=site[0], plan=plan)


def site_loss(node: Node, plan: Any, parameters: Parameters) -> float:
    """The log loss on the site's training split, standardized as the node trains on it."""
    task = MLPTask()
    model = task.build_model(node._data.spec, plan)
    task.set_parameters(model, parameters)
    return task.evaluate(model, node._prepare({}).train)["log_loss"]


def test_refit_sends_the_same_sparse_part_and_keeps_the_same_residual_over_rounds(site: Any) -> None:
    data, start = site
    refit_plan, plain_plan = mlp_plan(), mlp_plan(refit_dense=False)
    refit_node, plain_node = make_node(site, refit_plan), make_node(site, plain_plan)
    dense = topk_dense_mask(start.spec, fraction=FRACTION)
    assert 0 < dense.sum() < dense.size
    for round_number in (1, 2, 3):  # the same global weights each round: the residual grows alike
        refitted = train(refit_node, refit_plan, start, round_number=round_number).flatten()
        plain = train(plain_node, plain_plan, start, round_number=round_number).flatten()
        np.testing.assert_array_equal(refitted[~dense], plain[~dense])
        assert np.count_nonzero(refitted[~dense]) > 0
        assert not np.allclose(refitted[dense], plain[dense])
        np.testing.assert_array_equal(refit_node._feedback.residual, plain_node._feedback.residual)
        assert np.count_nonzero(refit_node._feedback.residual[dense]) == 0


def test_the_dense_tensors_are_trained_on_the_global_model_plus_the_sparse_part_sent(site: Any) -> None:
    _, start = site
    plan = mlp_plan()
    node = make_node(site, plan)
    sent = train(node, plan, start).flatten()
    # Again by hand: the body fixed at global + its selected part, the dense tensors from their global values.
    dense = topk_dense_mask(start.spec, fraction=FRACTION)
    task = MLPTask()
    model = task.build_model(node._data.spec, plan)
    base = start.flatten()
    task.set_parameters(model, Parameters.from_flat(np.where(dense, base, base + sent).astype(np.float32), start.spec))
    with trainable_only(model, {"0.bias", "2.weight", "2.bias"}):
        task.train(model, node._prepare({}).train, plan, seed=7)
    np.testing.assert_array_equal(sent[dense], (task.get_parameters(model).flatten() - base)[dense])


def test_refitted_dense_tensors_fit_the_sites_data_better_on_the_model_as_sent(site: Any) -> None:
    _, start = site
    longer = {"epochs": 10, "learning_rate": 0.05}  # the head moves far from what 10 % of the body supports

    def plan(**compression: Any) -> Any:
        data = mlp_plan(**compression).model_dump(mode="json", exclude_unset=True)
        return parse_plan({**data, "local": {**data["local"], **longer}})

    refit_plan, plain_plan = plan(), plan(refit_dense=False)
    node = make_node(site, refit_plan)
    updates = {"refit": train(node, refit_plan, start), "plain": train(make_node(site, plain_plan), plain_plan, start)}
    loss = {
        name: site_loss(node, refit_plan, Parameters.from_flat((start.flatten() + u.flatten()).astype(np.float32), start.spec))
        for name, u in updates.items()
    }
    assert loss["refit"] < loss["plain"] - 0.005, loss
    assert loss["refit"] < site_loss(node, refit_plan, start) - 0.2, loss


def test_a_site_out_of_time_sends_its_dense_tensors_as_trained(site: Any) -> None:
    _, start = site
    plans = [
        parse_plan({**plan.model_dump(mode="json", exclude_unset=True), "local": {**plan.local.model_dump(mode="json"),
                                                                                  "max_local_seconds": 1e-6}})
        for plan in (mlp_plan(), mlp_plan(refit_dense=False))
    ]  # fmt: skip
    refitted, plain = (train(make_node(site, plan), plan, start).flatten() for plan in plans)
    np.testing.assert_array_equal(refitted, plain)


def test_refit_dense_is_the_default_for_topk_only_and_off_under_record_level_dp() -> None:
    assert mlp_plan().compression.refits(record_level_dp=False)
    assert not mlp_plan(refit_dense=False).compression.refits(record_level_dp=False)
    assert not CompressionConfig(method="int8").refits(record_level_dp=False)
    dp = {
        "privacy": {"record_level": {"enabled": True, "epsilon": 3.0, "delta": 1e-5}},
        "local": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "learning_rate": 0.05},
    }
    plan = parse_plan({**mlp_plan().model_dump(mode="json", exclude_unset=True), **dp})
    assert not plan.compression.refits(record_level_dp=plan.privacy.record_level.enabled)


def test_refit_dense_is_refused_with_record_level_dp_and_with_another_method() -> None:
    base = mlp_plan(refit_dense=True).model_dump(mode="json", exclude_unset=True)
    dp = {"record_level": {"enabled": True, "epsilon": 3.0, "delta": 1e-5}}
    with pytest.raises(ConfigError, match="outside DP-SGD's per-example accounting") as raised:
        parse_plan({**base, "privacy": dp})
    assert "compression.refit_dense" in str(raised.value)
    with pytest.raises(ConfigError, match="applies only to method: topk") as raised:
        parse_plan({**base, "compression": {"method": "int8", "refit_dense": True}})
    assert "int8" in str(raised.value)


def test_trainable_only_leaves_the_others_unchanged_under_weight_decay_and_momentum() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    with trainable_only(model, {"2.weight", "2.bias"}):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            model(torch.randn(16, 4)).pow(2).mean().backward()
            optimizer.step()
    after = dict(model.named_parameters())
    for name in ("0.weight", "0.bias"):
        assert torch.equal(after[name], before[name]), name
    for name in ("2.weight", "2.bias"):
        assert not torch.equal(after[name], before[name]), name
    assert all(p.requires_grad for p in model.parameters())


def test_trainable_only_restores_every_flag_when_training_fails() -> None:
    model = torch.nn.Linear(3, 1)
    with pytest.raises(RuntimeError, match="boom"), trainable_only(model, {"bias"}):
        assert not model.weight.requires_grad and model.bias.requires_grad
        raise RuntimeError("boom")
    assert model.weight.requires_grad and model.bias.requires_grad
