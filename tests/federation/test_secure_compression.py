"""Compression under secure aggregation: the 16-bit ring, its halved upload, and the plans it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcare.data import DatasetCatalog
from fedcare.errors import ConfigError, ProtocolError
from fedcare.federation.coordinator import check_participation
from fedcare.federation.node import Node
from fedcare.federation.secure_aggregation import (
    NodeSecureAggregation,
    SecureRound,
    masked_parameters,
    masked_words,
)
from fedcare.messages import Job, JobKind, JobResult
from fedcare.params import Parameters
from fedcare.plan import CompressionConfig, Plan, SecureAggregationConfig, load_plan, parse_plan, plan_hash
from fedcare.privacy.secagg import quantization_error_bound
from fedcare.simulation import simulate
from fedcare.tasks.tabular import LogisticTask

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart_disease.yaml"
NODES = ("a", "b", "c", "d")


def _plan(method: str, **extra: Any) -> dict[str, Any]:
    return {
        "task": "tabular-logistic",
        "dataset": {"name": "heart-disease"},
        "rounds": 1,
        "secure_aggregation": {"enabled": True},
        "compression": {"method": method},
        **extra,
    }


def heart_plan(method: str) -> Plan:
    """The canonical heart-disease plan (secure aggregation on) with ``max_examples`` near the largest site."""
    plan = load_plan(EXAMPLE)
    secure = plan.secure_aggregation.model_copy(update={"max_examples": 1000})
    return plan.model_copy(update={"secure_aggregation": secure, "compression": CompressionConfig(method=method)})


def _secure_round(
    method: str, *, model_size: int, updates: dict[str, np.ndarray], examples: dict[str, int]
) -> tuple[SecureRound, dict[str, JobResult], np.ndarray]:
    """Drive one secure round through SecureRound and each node's NodeSecureAggregation; return the unmasked sum too."""
    compression = CompressionConfig(method=method)  # type: ignore[arg-type]
    secure = SecureRound(
        config=SecureAggregationConfig(enabled=True, clip=1.0, max_examples=100),
        run_id="run",
        round_number=1,
        nodes=list(updates),
        model_size=model_size,
        compression=compression,
    )
    nodes = {name: NodeSecureAggregation(ring_bits=secure.context.ring_bits) for name in updates}
    keys = {
        secure.index(name): node.start(
            config=secure.train_config(name), run_id="run", round_number=1, update=updates[name], num_examples=examples[name]
        )
        for name, node in nodes.items()
    }
    rosters = secure.server.receive_keys(keys)
    shares = {}
    for name, node in nodes.items():
        roster = {str(j): a for j, a in rosters[secure.index(name)].items()}
        data, _, _ = node.step(config={"secagg_phase": "share_keys", "roster": roster}, run_id="run", round_number=1)
        shares[secure.index(name)] = {int(j): c for j, c in data["shares"].items()}
    routed = secure.server.receive_shares(shares)
    answers = {}
    for name, node in nodes.items():
        ciphertexts = {str(j): c for j, c in routed[secure.index(name)].items()}
        _, packed, _ = node.step(
            config={"secagg_phase": "masked_input", "ciphertexts": ciphertexts}, run_id="run", round_number=1
        )
        answers[name] = JobResult("run", 1, "j", JobKind.SECAGG, name, update=packed)
        secure.server.add_masked_input(secure.index(name), secure.masked_words(packed))
    survivors = secure.server.survivors()
    signatures = {}
    for name, node in nodes.items():
        data, _, _ = node.step(config={"secagg_phase": "consistency_check", "survivors": survivors}, run_id="run", round_number=1)
        signatures[secure.index(name)] = data["signature"]
    signed = secure.server.receive_signatures(signatures)
    reveals = {}
    for name, node in nodes.items():
        config = {"secagg_phase": "unmask", "survivors": survivors, "signatures": {str(i): s for i, s in signed.items()}}
        data, _, _ = node.step(config=config, run_id="run", round_number=1)
        reveals[secure.index(name)] = {int(j): s for j, s in data["shares"].items()}
    return secure, answers, secure.server.finish(reveals)


# -- the wire form -----------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 7, 8])
def test_packed_16_bit_masked_input_round_trips_in_half_the_words(length):
    words = np.random.default_rng(length).integers(0, 2**16, size=length, dtype=np.uint32)
    words[0] = 2**16 - 1

    packed = masked_parameters(words, ring_bits=16)

    assert packed.num_elements == (length + 1) // 2
    assert np.array_equal(masked_words(packed, length=length, ring_bits=16), words)


def test_packed_masked_input_with_a_non_zero_padding_half_is_refused():
    packed = masked_parameters(np.array([1, 2, 3], dtype=np.uint32), ring_bits=16)
    raw = packed.flatten().view(np.uint32).copy()
    raw[-1] |= np.uint32(1 << 16)
    tampered = Parameters.from_flat(raw.view(np.float32), packed.spec)
    with pytest.raises(ProtocolError, match="padding"):
        masked_words(tampered, length=3, ring_bits=16)


def test_a_32_bit_masked_input_is_refused_in_a_16_bit_round():
    wide = masked_parameters(np.zeros(9, dtype=np.uint32))
    with pytest.raises(ProtocolError, match=r"16-bit ring must be one tensor secagg.masked\[5\]"):
        masked_words(wide, length=9, ring_bits=16)


def test_16_bit_ring_halves_the_masked_upload_and_keeps_the_weighted_mean():
    model_size = 10_000
    rng = np.random.default_rng(3)
    updates = {name: rng.uniform(-0.5, 0.5, size=model_size).astype(np.float32) for name in NODES}
    examples = {"a": 100, "b": 50, "c": 80, "d": 20}

    narrow, narrow_answers, narrow_total = _secure_round("int8", model_size=model_size, updates=updates, examples=examples)
    wide, wide_answers, wide_total = _secure_round("none", model_size=model_size, updates=updates, examples=examples)

    assert (narrow.context.ring_bits, wide.context.ring_bits) == (16, 32)
    for name in NODES:
        assert wide_answers[name].payload_bytes == 4 * (model_size + 1)
        assert narrow_answers[name].payload_bytes == 4 * ((model_size + 2) // 2)  # 20,004 bytes instead of 40,004
    weights = np.array([examples[n] / 100 for n in NODES])
    expected = np.sum([w * updates[n].astype(np.float64) for w, n in zip(weights, NODES)], axis=0) / weights.sum()
    for secure, total in ((narrow, narrow_total), (wide, wide_total)):
        mean, weight = secure.weighted_mean(total)
        bound = quantization_error_bound(scale=secure.context.scale, num_summed=len(NODES))
        assert abs(weight - weights.sum()) <= bound
        # The numerator and the weight are each off by less than the bound; the mean by at most twice it over the weight.
        assert np.abs(mean - expected).max() <= 2 * bound / (weights.sum() - bound)
    narrow_mean, _ = narrow.weighted_mean(narrow_total)
    assert np.abs(narrow_mean - expected).max() > 1e-6  # the narrow ring is coarser: this test sees it


# -- what the plan refuses ----------------------------------------------------------------


def test_plan_refuses_topk_with_secure_aggregation_and_suggests_int8():
    with pytest.raises(ConfigError) as caught:
        parse_plan(_plan("topk"))
    assert caught.value.field == "plan.compression.method"
    assert "masking makes every coordinate non-zero" in caught.value.message
    assert "compression.method: int8" in caught.value.message
    parse_plan({**_plan("topk"), "secure_aggregation": {"enabled": False}})  # fine without secure aggregation


@pytest.mark.parametrize(("method", "most"), [("int8", 254), ("bfloat16", 127), ("float16", 15)])
def test_plan_refuses_more_sites_than_the_16_bit_ring_holds_at_the_methods_resolution(method, most):
    parse_plan(_plan(method, nodes_per_round=most))
    with pytest.raises(ConfigError) as caught:
        parse_plan(_plan(method, nodes_per_round=most + 1))
    assert caught.value.field == "plan.compression.method"
    message = caught.value.message
    assert f"{method} under secure aggregation sums in the 16-bit ring, where {most + 1} sites leave" in message
    assert f"use at most {most} sites per round" in message
    assert "compression.method: none" in message


def test_coordinator_refuses_int8_secure_rounds_over_more_sites_than_the_16_bit_ring_holds():
    plan = parse_plan(_plan("int8"))  # no site count in the plan: the coordinator checks the nodes that exist
    assert check_participation(plan, [f"site-{i}" for i in range(254)]) == 254
    with pytest.raises(ConfigError, match="255 sites leave 126 quantization steps per clip") as caught:
        check_participation(plan, [f"site-{i}" for i in range(255)])
    assert caught.value.field == "plan.compression.method"


# -- what a node checks -------------------------------------------------------------------------


def test_node_refuses_a_round_announced_in_another_ring_than_its_approved_plan():
    plan = heart_plan("int8")
    plan = plan.model_copy(update={"dataset": plan.dataset.model_copy(update={"normalization": "per-site"})})
    data = DatasetCatalog.bundled().get("heart-disease").load_site(plan.dataset, "cleveland")
    task = LogisticTask()
    node = Node("cleveland", task=task, data=data, plan=plan)
    parameters = task.get_parameters(task.build_model(data.spec, plan))
    # A coordinator that sums in the 32-bit ring although the plan asks for int8 (a 16-bit ring).
    wide = SecureRound(
        config=plan.secure_aggregation, run_id="run", round_number=1, nodes=list(NODES), model_size=parameters.num_elements
    )
    job = Job("run", 1, "j1", JobKind.TRAIN, plan_hash=plan_hash(plan), parameters=parameters,
              config={"seed": 1, "secagg": wide.train_config("a")})  # fmt: skip

    answer = node.handle(job)

    assert answer.error is not None and "the round sums in the 32-bit ring" in answer.error
    assert "16-bit ring" in answer.error
    assert answer.update is None and not answer.data


# -- a whole federation -------------------------------------------------------------------------


def test_int8_secure_run_on_heart_disease_matches_the_32_bit_secure_run():
    narrow = simulate(heart_plan("int8"))
    wide = simulate(heart_plan("none"))

    assert narrow.final_evaluation is not None and wide.final_evaluation is not None
    assert abs(narrow.final_evaluation.mean["accuracy"] - wide.final_evaluation.mean["accuracy"]) <= 0.01
    assert narrow.final_evaluation.mean["accuracy"] >= 0.78
    difference = np.abs(narrow.parameters.flatten() - wide.parameters.flatten()).max()
    assert 1e-6 < difference < 1e-2  # coarser than the 32-bit ring (~1e-8), yet the same model
