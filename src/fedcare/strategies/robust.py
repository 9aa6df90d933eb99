"""Byzantine-robust aggregation rules: median, trimmed mean, Multi-Krum, geometric median, norm bounding.

:class:`CoordinateMedian`, :class:`TrimmedMean`, :class:`MultiKrum` and
:class:`GeometricMedian` must compare the updates with one another, so they
keep every update of the round until :meth:`~Strategy.finalize`: coordinator
memory is O(model x nodes), not the O(model) of FedAvg, and they cannot run
under secure aggregation, which only ever reveals the sum
(``needs_all_updates = True``). They ignore the example counts: a site's
claimed count is not checked, and weighting by it would let one attacker claim
a huge count and outvote everyone. :class:`NormBounding` streams, like FedAvg.

Every rule applies its robust estimate of the mean update with the server
learning rate: ``new = global + server_learning_rate * estimate``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedcare.errors import ConfigError, FederationError, ProtocolError
from fedcare.params import Parameters
from fedcare.strategies.base import Strategy
from fedcare.strategies.fedavg import FedAvg
from fedcare.strategies.kernels import (
    coordinate_median,
    krum_scores,
    l2_norm,
    trimmed_mean,
    weiszfeld,
)

__all__ = ["CoordinateMedian", "GeometricMedian", "MultiKrum", "NormBounding", "TrimmedMean"]


def _check_learning_rate(value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"must be > 0, got {value}", field="plan.strategy.server_learning_rate")


class _CollectingStrategy(Strategy):
    """Keeps the round's updates (unweighted) and combines them in :meth:`finalize`."""

    needs_all_updates = True

    def __init__(self, *, server_learning_rate: float) -> None:
        _check_learning_rate(server_learning_rate)
        self.server_learning_rate = server_learning_rate
        self._global: Parameters | None = None
        self._updates: list[np.ndarray] = []
        self._node_ids: list[str] = []
        self._round: int | None = None
        self._metrics: dict[str, Any] = {}

    def begin_round(self, round: int, global_parameters: Parameters) -> None:  # noqa: A002
        self._global = global_parameters
        self._updates, self._node_ids = [], []
        self._round = round

    def accumulate(self, update: Parameters, *, weight: float, node_id: str) -> None:
        if self._global is None:
            raise FederationError("accumulate() called before begin_round()")
        if update.spec != self._global.spec:
            raise ProtocolError("update does not match the model's tensors", node_id=node_id, round=self._round)
        if not weight > 0:
            raise ProtocolError(f"update weight must be > 0, got {weight}", node_id=node_id, round=self._round)
        # the weight is deliberately ignored: a claimed example count is not evidence
        self._updates.append(update.flatten())
        self._node_ids.append(node_id)

    def finalize(self) -> Parameters:
        if self._global is None:
            raise FederationError("finalize() called before begin_round()")
        if not self._updates:
            raise FederationError("no update was accumulated this round", round=self._round)
        stacked = np.stack(self._updates)
        self._updates = []
        estimate = np.empty(stacked.shape[1], dtype=np.float64)
        self._combine(stacked, estimate)
        estimate *= self.server_learning_rate
        estimate += self._global.flatten()
        new = Parameters.from_flat(estimate.astype(np.float32), self._global.spec)
        self._global, self._node_ids = None, []
        return new

    def _combine(self, updates: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError

    def round_metrics(self) -> dict[str, Any]:
        return dict(self._metrics)


class CoordinateMedian(_CollectingStrategy):
    """Coordinate-wise median of the updates (Yin et al. 2018), unweighted.

    Tolerates fewer than half of the updates being arbitrary in each
    coordinate. Keeps every update of the round: memory O(model x nodes);
    cannot run under secure aggregation.

    Parameters
    ----------
    server_learning_rate : float
        Step size applied to the median update (> 0; 1.0 applies it as is).

    Raises
    ------
    ConfigError
        If ``server_learning_rate`` is not positive (field ``plan.strategy.server_learning_rate``).

    Examples
    --------
    >>> s = CoordinateMedian()
    >>> s.begin_round(1, Parameters({"w": np.zeros(2)}))
    >>> for node, w in [("a", [1.0, 1.0]), ("b", [2.0, -1.0]), ("c", [900.0, 0.0])]:
    ...     s.accumulate(Parameters({"w": w}), weight=1, node_id=node)
    >>> s.finalize()["w"].tolist()
    [2.0, 0.0]
    """

    def __init__(self, *, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate=server_learning_rate)

    def _combine(self, updates: np.ndarray, out: np.ndarray) -> None:
        coordinate_median(updates, out)


class TrimmedMean(_CollectingStrategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018), unweighted.

    With ``n`` updates, ``k = ceil(trim_fraction * n)`` values are dropped at
    each end of every coordinate and the rest averaged, so up to ``k``
    arbitrary updates are tolerated; ``2 * k < n`` is needed. Keeps every
    update of the round: memory O(model x nodes); cannot run under secure aggregation.

    Parameters
    ----------
    trim_fraction : float
        Share of the updates dropped at each end (``0 <= trim_fraction < 0.5``).
    server_learning_rate : float
        Step size applied to the trimmed-mean update (> 0).

    Raises
    ------
    ConfigError
        If a parameter is out of range (field ``plan.strategy.trim_fraction`` or
        ``plan.strategy.server_learning_rate``).

    Examples
    --------
    >>> s = TrimmedMean(trim_fraction=0.25)
    >>> s.begin_round(1, Parameters({"w": np.zeros(1)}))
    >>> for node, w in [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", -500.0)]:
    ...     s.accumulate(Parameters({"w": [w]}), weight=1, node_id=node)
    >>> s.finalize()["w"].tolist()
    [1.5]
    """

    def __init__(self, *, trim_fraction: float = 0.1, server_learning_rate: float = 1.0) -> None:
        if not (math.isfinite(trim_fraction) and 0 <= trim_fraction < 0.5):
            raise ConfigError(f"must be >= 0 and < 0.5, got {trim_fraction}", field="plan.strategy.trim_fraction")
        super().__init__(server_learning_rate=server_learning_rate)
        self.trim_fraction = trim_fraction

    def trim_count(self, num_updates: int) -> int:
        """Values dropped at each end for ``num_updates`` updates: ``ceil(trim_fraction * n)``.

        Examples
        --------
        >>> TrimmedMean(trim_fraction=0.1).trim_count(10), TrimmedMean(trim_fraction=0.1).trim_count(11)
        (1, 2)
        """
        return max(0, math.ceil(self.trim_fraction * num_updates - 1e-9))

    def _combine(self, updates: np.ndarray, out: np.ndarray) -> None:
        count = updates.shape[0]
        trim = self.trim_count(count)
        if 2 * trim >= count:
            raise FederationError(
                f"the trimmed mean drops {trim} updates at each end (trim_fraction {self.trim_fraction}) and needs "
                f"more than {2 * trim} updates, but only {count} arrived; lower plan.strategy.trim_fraction or "
                "select more nodes per round",
                round=self._round,
            )
        self._metrics = {"trimmed_per_side": trim}
        trimmed_mean(updates, trim, out)


class MultiKrum(_CollectingStrategy):
    """Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018), unweighted.

    Each update's score is the sum of its squared L2 distances to its
    ``n - f - 2`` nearest other updates; the ``num_selected`` updates with the
    lowest scores are averaged. Tolerates ``f`` arbitrary updates when
    ``n > 2 * f + 2``. ``num_selected = 1`` is plain Krum. Keeps every update of
    the round: memory O(model x nodes); cannot run under secure aggregation.

    Parameters
    ----------
    num_byzantine : int
        ``f``, the number of attackers to tolerate (>= 0).
    num_selected : int, optional
        ``m``, how many updates are averaged (1 <= m <= n - f); default ``n - f``.
    server_learning_rate : float
        Step size applied to the averaged update (> 0).

    Raises
    ------
    ConfigError
        If a parameter is out of range (field ``plan.strategy.byzantine_nodes``,
        ``plan.strategy.krum_selected`` or ``plan.strategy.server_learning_rate``).

    Examples
    --------
    >>> s = MultiKrum(num_byzantine=1, num_selected=2)
    >>> s.begin_round(1, Parameters({"w": np.zeros(1)}))
    >>> for node, w in [("a", 0.0), ("b", 1.0), ("c", 2.0), ("d", 3.0), ("e", 50.0)]:
    ...     s.accumulate(Parameters({"w": [w]}), weight=1, node_id=node)
    >>> s.finalize()["w"].tolist(), s.round_metrics()["krum_selected"]
    ([1.5], ['b', 'c'])
    """

    def __init__(
        self, *, num_byzantine: int = 1, num_selected: int | None = None, server_learning_rate: float = 1.0
    ) -> None:
        if num_byzantine < 0:
            raise ConfigError(f"must be >= 0, got {num_byzantine}", field="plan.strategy.byzantine_nodes")
        if num_selected is not None and num_selected < 1:
            raise ConfigError(f"must be >= 1, got {num_selected}", field="plan.strategy.krum_selected")
        super().__init__(server_learning_rate=server_learning_rate)
        self.num_byzantine = num_byzantine
        self.num_selected = num_selected

    def _combine(self, updates: np.ndarray, out: np.ndarray) -> None:
        count, f = updates.shape[0], self.num_byzantine
        if count <= 2 * f + 2:
            raise FederationError(
                f"Krum tolerating {f} attackers needs more than 2 * {f} + 2 = {2 * f + 2} updates, but only "
                f"{count} arrived; lower plan.strategy.byzantine_nodes or select more nodes per round",
                round=self._round,
            )
        selected = count - f if self.num_selected is None else self.num_selected
        if selected > count - f:
            raise FederationError(
                f"Krum would average {selected} updates but at most n - f = {count - f} may be kept "
                f"({count} arrived); lower plan.strategy.krum_selected",
                round=self._round,
            )
        scores = krum_scores(updates, f)
        chosen = sorted(np.argsort(scores, kind="stable")[:selected].tolist())
        self._metrics = {"krum_selected": [self._node_ids[i] for i in chosen]}
        np.mean(updates[chosen], axis=0, dtype=np.float64, out=out)


class GeometricMedian(_CollectingStrategy):
    """Geometric median of the updates by smoothed Weiszfeld (Pillutla et al. 2022, RFA), unweighted.

    The point minimizing the sum of L2 distances to the updates; its breakdown
    point is one half, so fewer than half of the updates may be arbitrary.
    Keeps every update of the round: memory O(model x nodes); cannot run under
    secure aggregation.

    Parameters
    ----------
    max_iterations : int
        At most this many Weiszfeld steps per round (>= 1).
    tolerance : float
        Stop once the objective improves by less than this share of itself (> 0).
    smoothing : float
        Distances below it are treated as it (> 0), so no step divides by zero.
    server_learning_rate : float
        Step size applied to the median update (> 0).

    Raises
    ------
    ConfigError
        If a parameter is out of range (field ``plan.strategy.geometric_median_iterations``
        or ``plan.strategy.server_learning_rate``).

    Examples
    --------
    >>> s = GeometricMedian(max_iterations=200)
    >>> s.begin_round(1, Parameters({"w": np.zeros(1)}))
    >>> for node, w in [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 1000.0)]:
    ...     s.accumulate(Parameters({"w": [w]}), weight=1, node_id=node)
    >>> 1.0 <= float(s.finalize()["w"][0]) <= 3.0
    True
    """

    def __init__(
        self,
        *,
        max_iterations: int = 100,
        tolerance: float = 1e-6,
        smoothing: float = 1e-6,
        server_learning_rate: float = 1.0,
    ) -> None:
        if max_iterations < 1:
            raise ConfigError(f"must be >= 1, got {max_iterations}", field="plan.strategy.geometric_median_iterations")
        if not (math.isfinite(tolerance) and tolerance > 0):
            raise ConfigError(f"tolerance must be > 0, got {tolerance}", field="plan.strategy")
        if not (math.isfinite(smoothing) and smoothing > 0):
            raise ConfigError(f"smoothing must be > 0, got {smoothing}", field="plan.strategy")
        super().__init__(server_learning_rate=server_learning_rate)
        self.max_iterations = max_iterations
        self.tolerance = tolerance
        self.smoothing = smoothing

    def _combine(self, updates: np.ndarray, out: np.ndarray) -> None:
        steps = weiszfeld(
            updates, out, max_iterations=self.max_iterations, tolerance=self.tolerance, smoothing=self.smoothing
        )
        self._metrics = {"weiszfeld_iterations": steps}


class NormBounding(FedAvg):
    """Clip each update to an L2 norm of ``max_norm``, then FedAvg (Sun et al. 2019); streaming.

    ``new = global + server_learning_rate * sum(w_i * clip(update_i)) / sum(w_i)``
    with ``clip(u) = u * min(1, max_norm / ||u||)``. It bounds how far one
    update can pull the model, but does not remove it, and it keeps FedAvg's
    example weights, so it trusts the claimed counts. Memory is O(model).

    Parameters
    ----------
    max_norm : float
        The L2 bound of one update (> 0), in parameter units.
    server_learning_rate : float
        Step size applied to the averaged update (> 0).

    Raises
    ------
    ConfigError
        If a parameter is out of range (field ``plan.strategy.max_norm`` or
        ``plan.strategy.server_learning_rate``).

    Examples
    --------
    >>> s = NormBounding(max_norm=1.0)
    >>> s.begin_round(1, Parameters({"w": np.zeros(2)}))
    >>> s.accumulate(Parameters({"w": [30.0, 40.0]}), weight=1, node_id="a")
    >>> s.accumulate(Parameters({"w": [0.2, 0.0]}), weight=1, node_id="b")
    >>> [round(v, 4) for v in s.finalize()["w"].tolist()], s.round_metrics()
    ([0.4, 0.4], {'norm_bounding_clipped': 1})
    """

    def __init__(self, *, max_norm: float = 1.0, server_learning_rate: float = 1.0) -> None:
        if not (math.isfinite(max_norm) and max_norm > 0):
            raise ConfigError(f"must be > 0, got {max_norm}", field="plan.strategy.max_norm")
        _check_learning_rate(server_learning_rate)
        super().__init__(server_learning_rate=server_learning_rate)
        self.max_norm = max_norm
        self._clipped = 0
        self._metrics: dict[str, Any] = {}

    def begin_round(self, round: int, global_parameters: Parameters) -> None:  # noqa: A002
        super().begin_round(round, global_parameters)
        self._clipped = 0

    def accumulate(self, update: Parameters, *, weight: float, node_id: str) -> None:
        norm = l2_norm(update.flatten())
        scale = 1.0
        if norm > self.max_norm:
            scale = self.max_norm / norm
        self._fold(update, weight=weight, node_id=node_id, scale=scale)
        self._clipped += scale < 1.0

    def finalize(self) -> Parameters:
        new = super().finalize()
        self._metrics = {"norm_bounding_clipped": self._clipped}
        return new

    def round_metrics(self) -> dict[str, Any]:
        return dict(self._metrics)
