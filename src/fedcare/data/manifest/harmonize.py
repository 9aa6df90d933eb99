"""Pure steps of loading a site: label harmonization, arrays of the plan's shape, the patient-level split."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedcare.data.manifest.model import Preprocessing
from fedcare.data.readers import ImageRecord
from fedcare.errors import DataError

__all__ = ["LabelHarmonization", "build_images", "harmonize_labels", "patient_split"]


# -- labels -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelHarmonization:
    """The outcome of mapping local labels onto the federation's vocabulary.

    Attributes
    ----------
    y : numpy.ndarray
        ``(n,)`` int64 class index of each record, -1 where the record is not kept.
    unmapped : dict of str to int
        Local labels with no mapping, with their record counts.
    dropped : dict of str to int
        Local labels mapped to ``null``, with their counts.
    outside_vocabulary : dict of str to int
        Federation labels ``label_map`` names that the vocabulary lacks, with counts.
    unlabelled : int
        Records with no local label at all (e.g. missing from the labels file).
    """

    y: np.ndarray
    unmapped: dict[str, int]
    dropped: dict[str, int]
    outside_vocabulary: dict[str, int]
    unlabelled: int

    @property
    def kept(self) -> np.ndarray:
        """Boolean mask of the records that have a class index."""
        return np.asarray(self.y >= 0)


def harmonize_labels(
    local_labels: Sequence[str | None], *, label_map: Mapping[str, str | None] | None, vocabulary: Sequence[str]
) -> LabelHarmonization:
    """Map each record's local label onto an index of ``vocabulary``.

    A local label in ``label_map`` maps to its target (``None``: dropped);
    one not in it is unmapped. Without ``label_map`` a local label is its own
    target. A target not in ``vocabulary`` is counted in ``outside_vocabulary``.

    Examples
    --------
    >>> h = harmonize_labels(["NORMAL", "PNEUMONIA", "QA", "other", None],
    ...                      label_map={"NORMAL": "normal", "PNEUMONIA": "pneumonia", "QA": None},
    ...                      vocabulary=["normal", "pneumonia"])
    >>> h.y.tolist(), h.unmapped, h.dropped, h.unlabelled
    ([0, 1, -1, -1, -1], {'other': 1}, {'QA': 1}, 1)
    """
    index = {name: i for i, name in enumerate(vocabulary)}
    y = np.full(len(local_labels), -1, dtype=np.int64)
    unmapped: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    outside: Counter[str] = Counter()
    unlabelled = 0
    for i, local in enumerate(local_labels):
        if local is None:
            unlabelled += 1
            continue
        if label_map is not None and local not in label_map:
            unmapped[local] += 1
            continue
        target = label_map[local] if label_map is not None else local
        if target is None:
            dropped[local] += 1
        elif target in index:
            y[i] = index[target]
        elif label_map is None:
            unmapped[local] += 1
        else:
            outside[target] += 1
    return LabelHarmonization(
        y=y,
        unmapped=dict(sorted(unmapped.items())),
        dropped=dict(sorted(dropped.items())),
        outside_vocabulary=dict(sorted(outside.items())),
        unlabelled=unlabelled,
    )


def _listing(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name!r} ({n})" for name, n in counts.items())


# -- arrays -------------------------------------------------------------------------------------


def _intensity(array: np.ndarray, settings: Preprocessing) -> np.ndarray:
    values = array.astype(np.float32, copy=True)
    if settings.intensity == "minmax":
        low, high = float(values.min()), float(values.max())
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    elif settings.intensity == "fixed":
        assert settings.range is not None  # checked by the model
        low, high = settings.range
        values = (values - low) / (high - low)
    return np.clip(values, 0.0, 1.0)


def _channels(array: np.ndarray, channels: int) -> np.ndarray | None:
    have = array.shape[0]
    if have == channels:
        return array
    if have == 1:
        return np.repeat(array, channels, axis=0)
    if channels == 1:
        return np.asarray(array.mean(axis=0, keepdims=True), dtype=np.float32)
    return None


def build_images(
    records: Sequence[ImageRecord], *, input_shape: Sequence[int], preprocess: Preprocessing
) -> tuple[np.ndarray, np.ndarray, Counter[str]]:
    """Records as one float32 ``(n, *input_shape)`` array in [0, 1].

    Each record's intensities are scaled (``preprocess``), its channels
    adapted (gray repeated to C channels, colour averaged to one) and its
    spatial size resized (bilinear with antialiasing for images, trilinear
    for volumes; PyTorch's ``interpolate``).

    Returns
    -------
    (x, kept, skipped)
        The array of the kept records, a boolean mask over ``records``, and
        the records left out by reason ("wrong number of dimensions",
        "incompatible channels").

    Examples
    --------
    >>> records = [ImageRecord(np.arange(12, dtype=np.float32).reshape(1, 3, 4), "a"),
    ...            ImageRecord(np.ones((3, 8, 8), np.float32), "b")]
    >>> x, kept, skipped = build_images(records, input_shape=(1, 6, 6), preprocess=Preprocessing())
    >>> x.shape, x.dtype, float(x.max()), kept.tolist()
    ((2, 1, 6, 6), dtype('float32'), 1.0, [True, True])
    """
    import torch
    import torch.nn.functional as functional

    shape = tuple(int(n) for n in input_shape)
    channels, spatial = shape[0], shape[1:]
    kept = np.zeros(len(records), dtype=bool)
    skipped: Counter[str] = Counter()
    prepared: dict[int, np.ndarray] = {}
    for i, record in enumerate(records):
        if record.array.ndim != len(shape):
            skipped["wrong number of dimensions"] += 1
            continue
        adapted = _channels(_intensity(record.array, preprocess), channels)
        if adapted is None:
            skipped["incompatible channels"] += 1
            continue
        prepared[i] = adapted
        kept[i] = True
    out = np.empty((len(prepared), *shape), dtype=np.float32)
    position = {i: n for n, i in enumerate(sorted(prepared))}
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, array in prepared.items():
        by_shape.setdefault(tuple(array.shape), []).append(i)
    for source_shape, members in by_shape.items():
        batch = np.stack([prepared[i] for i in members])
        if source_shape[1:] != spatial:
            tensor = torch.from_numpy(batch)
            if len(spatial) == 2:
                tensor = functional.interpolate(tensor, size=spatial, mode="bilinear", align_corners=False, antialias=True)
            else:
                tensor = functional.interpolate(tensor, size=spatial, mode="trilinear", align_corners=False)
            batch = tensor.numpy()
        out[[position[i] for i in members]] = np.clip(batch, 0.0, 1.0)
    return out, kept, skipped


# -- split --------------------------------------------------------------------------------------


def patient_split(
    y: np.ndarray, groups: Sequence[str], *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Patient-level train/test row indices: all of a patient's records fall on one side.

    Stratified by label (``StratifiedGroupKFold`` with
    ``round(1 / test_fraction)`` folds, the first fold as test) when every
    class has at least that many patients; otherwise ``GroupShuffleSplit``
    with ``test_size=test_fraction``. Deterministic for a seed.

    Raises
    ------
    DataError
        If there are fewer than two patients.

    Examples
    --------
    >>> y = np.array([0, 0, 1, 1, 0, 1, 0, 1, 0, 1])
    >>> groups = ["p1", "p1", "p2", "p2", "p3", "p4", "p5", "p6", "p7", "p8"]
    >>> train, test = patient_split(y, groups, test_fraction=0.25, seed=0)
    >>> sorted({groups[i] for i in train} & {groups[i] for i in test})
    []
    """
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    codes = np.unique(np.asarray(groups, dtype=object), return_inverse=True)[1].reshape(-1)
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    if n_groups < 2:
        raise DataError(f"{n_groups} patient(s) cannot be split into train and test", field="split")
    n_splits = max(2, int(round(1 / test_fraction)))
    rows = np.zeros((len(y), 1))
    classes = np.unique(y)
    groups_per_class = [len(np.unique(codes[y == c])) for c in classes]
    if len(classes) > 1 and min(groups_per_class) >= n_splits:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        train, test = next(splitter.split(rows, y, codes))
    else:
        shuffle = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
        train, test = next(shuffle.split(rows, y, codes))
    return np.sort(train), np.sort(test)
