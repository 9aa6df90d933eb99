"""Research-only attack simulation: make chosen simulated sites misbehave.

**For studying robust aggregation in simulation only.** Nothing here is used
by deployments: attacks are applied by :func:`fedcare.simulation.simulate`
around in-process nodes, never by :class:`~fedcare.federation.node.Node`,
the coordinator or the gRPC transport.

Two kinds of attack:

* model poisoning (:class:`SignFlip`, :class:`Scaling`, :class:`GaussianNoise`)
  replaces the update a site's TRAIN result carries with a fresh, transformed
  :class:`~fedcare.params.Parameters` (the node's own update is never changed);
* data poisoning (:class:`LabelFlip`) gives the node flipped training labels
  before the node is built; its test split is left as it is.

Examples
--------
>>> from fedcare.plan import parse_plan
>>> from fedcare.simulation import simulate
>>> plan = parse_plan({"task": "tabular-logistic", "rounds": 1, "strategy": {"name": "median"},
...                    "dataset": {"name": "breast-cancer", "num_nodes": 4}})
>>> result = simulate(plan, attacks={"site-3": SignFlip(scale=10.0)})
>>> result.rounds_completed
1
"""

from __future__ import annotations

import abc
import dataclasses
import math
import zlib

import numpy as np

from fedcare.errors import ConfigError
from fedcare.messages import Job, JobKind, JobResult
from fedcare.params import Parameters
from fedcare.tasks.base import SiteData, Split
from fedcare.transport.base import NodeChannel, NodeRunner

__all__ = ["Attack", "GaussianNoise", "LabelFlip", "Scaling", "SignFlip", "attacked_runner"]


class Attack(abc.ABC):
    """What one attacking simulated site does; research only.

    Subclasses override :meth:`poison_update` (model poisoning), :meth:`poison_data`
    (data poisoning) or both; the defaults leave things as they are.
    """

    #: True when :meth:`poison_update` changes the update (secure aggregation would hide it from this module).
    poisons_updates: bool = False

    def poison_update(self, update: Parameters, *, round: int, node_id: str) -> Parameters:  # noqa: A002
        """A new update to send instead of ``update`` (which is left unchanged)."""
        return update

    def poison_data(self, data: SiteData) -> SiteData:
        """The site data the node is built with (a copy where changed)."""
        return data


def _transformed(update: Parameters, vector: np.ndarray) -> Parameters:
    return Parameters.from_flat(np.ascontiguousarray(vector, dtype=np.float32), update.spec)


class SignFlip(Attack):
    """Send ``-scale * update``; research only.

    Parameters
    ----------
    scale : float
        Factor applied after flipping the sign (> 0).

    Raises
    ------
    ConfigError
        If ``scale`` is not positive and finite.

    Examples
    --------
    >>> u = Parameters({"w": [1.0, -2.0]})
    >>> SignFlip(scale=10.0).poison_update(u, round=1, node_id="site-0")["w"].tolist(), u["w"].tolist()
    ([-10.0, 20.0], [1.0, -2.0])
    """

    poisons_updates = True

    def __init__(self, *, scale: float = 1.0) -> None:
        if not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"must be > 0, got {scale}", field="attacks.sign_flip.scale")
        self.scale = scale

    def poison_update(self, update: Parameters, *, round: int, node_id: str) -> Parameters:  # noqa: A002
        return _transformed(update, update.flatten() * np.float32(-self.scale))


class Scaling(Attack):
    """Send ``factor * update`` (a boosted update, as in model replacement); research only.

    Parameters
    ----------
    factor : float
        Multiplier (finite, non-zero).

    Raises
    ------
    ConfigError
        If ``factor`` is zero or not finite.

    Examples
    --------
    >>> Scaling(factor=3.0).poison_update(Parameters({"w": [1.0, 2.0]}), round=1, node_id="a")["w"].tolist()
    [3.0, 6.0]
    """

    poisons_updates = True

    def __init__(self, *, factor: float) -> None:
        if not (math.isfinite(factor) and factor != 0):
            raise ConfigError(f"must be finite and non-zero, got {factor}", field="attacks.scaling.factor")
        self.factor = factor

    def poison_update(self, update: Parameters, *, round: int, node_id: str) -> Parameters:  # noqa: A002
        return _transformed(update, update.flatten() * np.float32(self.factor))


class GaussianNoise(Attack):
    """Send ``update + N(0, stddev**2)`` per coordinate; research only.

    The noise of each round and site is drawn from
    ``numpy.random.default_rng([seed, round, crc32(node_id)])``, so a study repeats exactly.

    Parameters
    ----------
    stddev : float
        Noise standard deviation (> 0), in parameter units.
    seed : int
        Seed of the noise (>= 0).

    Raises
    ------
    ConfigError
        If ``stddev`` is not positive and finite or ``seed`` is negative.

    Examples
    --------
    >>> attack = GaussianNoise(stddev=10.0, seed=0)
    >>> u = Parameters({"w": np.zeros(10_000)})
    >>> noisy = attack.poison_update(u, round=1, node_id="site-0")
    >>> round(float(noisy["w"].std())), float(u["w"].std())
    (10, 0.0)
    """

    poisons_updates = True

    def __init__(self, *, stddev: float, seed: int = 0) -> None:
        if not (math.isfinite(stddev) and stddev > 0):
            raise ConfigError(f"must be > 0, got {stddev}", field="attacks.gaussian_noise.stddev")
        if seed < 0:
            raise ConfigError(f"must be >= 0, got {seed}", field="attacks.gaussian_noise.seed")
        self.stddev = stddev
        self.seed = seed

    def poison_update(self, update: Parameters, *, round: int, node_id: str) -> Parameters:  # noqa: A002
        rng = np.random.default_rng([self.seed, round, zlib.crc32(node_id.encode("utf-8"))])
        noise = rng.standard_normal(update.num_elements) * self.stddev
        return _transformed(update, update.flatten() + noise)


class LabelFlip(Attack):
    """Train on flipped labels (``y -> num_classes - 1 - y``, i.e. ``1 - y`` for binary tasks); research only.

    Only the training split is flipped; the test split, used for evaluation, is unchanged.

    Examples
    --------
    >>> from fedcare.tasks.base import DataSpec
    >>> spec = DataSpec(num_features=1, num_classes=2, feature_names=("f",), class_names=("no", "yes"),
    ...                 feature_bounds=((0.0, 1.0),))
    >>> split = Split(np.zeros((3, 1), dtype=np.float32), np.array([0, 1, 1]))
    >>> data = SiteData("a", spec, split, split)
    >>> poisoned = LabelFlip().poison_data(data)
    >>> poisoned.train.y.tolist(), poisoned.test.y.tolist(), data.train.y.tolist()
    ([1, 0, 0], [0, 1, 1], [0, 1, 1])
    """

    def poison_data(self, data: SiteData) -> SiteData:
        flipped = (data.spec.num_classes - 1 - data.train.y).astype(data.train.y.dtype)
        return dataclasses.replace(data, train=Split(data.train.x, flipped, time=data.train.time))


class _AttackedChannel(NodeChannel):
    """A node channel whose TRAIN results carry the attack's update instead of the node's."""

    def __init__(self, channel: NodeChannel, attack: Attack, node_id: str) -> None:
        self._channel = channel
        self._attack = attack
        self._node_id = node_id

    def pull_job(self, *, timeout_s: float) -> Job | None:
        return self._channel.pull_job(timeout_s=timeout_s)

    def push_result(self, result: JobResult) -> None:
        if result.kind is JobKind.TRAIN and result.update is not None and result.error is None:
            poisoned = self._attack.poison_update(result.update, round=result.round, node_id=self._node_id)
            result = dataclasses.replace(result, update=poisoned)
        self._channel.push_result(result)

    @property
    def closed(self) -> bool:
        return self._channel.closed


def attacked_runner(runner: NodeRunner, attack: Attack, *, node_id: str) -> NodeRunner:
    """Wrap a node runner so that ``attack`` rewrites its TRAIN updates on the way out; research only.

    Parameters
    ----------
    runner : callable
        What serves the node (e.g. ``node.serve``), given its channel.
    attack : Attack
        The attack; only :meth:`Attack.poison_update` is applied here
        (:meth:`Attack.poison_data` is applied to the data before the node is built).
    node_id : str
        The attacking site, passed to the attack (e.g. to seed its noise).

    Returns
    -------
    callable
        A runner for :meth:`fedcare.transport.inproc.InProcTransport.add_node`.

    Examples
    --------
    >>> seen = []
    >>> runner = attacked_runner(seen.append, SignFlip(), node_id="site-0")
    >>> callable(runner)
    True
    """
    if not attack.poisons_updates:
        return runner

    def run(channel: NodeChannel) -> None:
        runner(_AttackedChannel(channel, attack, node_id))

    return run
