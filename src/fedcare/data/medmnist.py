"""MedMNIST v2 (28x28) datasets shipped with fedcare: PneumoniaMNIST, BreastMNIST, RetinaMNIST.

The official ``.npz`` files (``data/bundled/medmnist/``, provenance and
licence in ``data/bundled/README.md``) are read with ``allow_pickle=False``
after their SHA-256 is checked. Images become float32 in [0, 1] of shape
``(n, channels, 28, 28)``.

Each site's training split is its share of the official training split; its
test split is its share of the official test split, drawn with the same
per-class shares as its training split, so the sites' test splits together
are exactly the official test split. With ``validation_fraction > 0`` the
test split is replaced by the site's share of the official validation split
(drawn the same way; the fraction only switches this on, the official split
fixes the size), so hyperparameters are chosen without the test split.
Partitions use fixed seeds, independent of ``plan.seed``.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import ClassVar

import numpy as np

from fedcare.data.catalog import BundledDataset, DatasetInfo, _bundled_path
from fedcare.data.splits import dirichlet_partition, iid_partition
from fedcare.errors import ConfigError, DataError
from fedcare.plan import DatasetConfig
from fedcare.tasks.base import DataSpec, SiteData, Split

__all__ = ["BreastMNIST", "MedMNIST", "PneumoniaMNIST", "RetinaMNIST", "load_npz", "shares_like"]

#: Seed of every site partition: the same sites whatever the training seed.
PARTITION_SEED = 0
_SPLITS = ("train", "val", "test")
_MAX_NPZ_BYTES = 64 * 1024 * 1024


def load_npz(path: Path, *, sha256: str) -> dict[str, np.ndarray]:
    """Read a MedMNIST ``.npz`` file after checking its SHA-256.

    Parameters
    ----------
    path : Path
        The file.
    sha256 : str
        Its recorded SHA-256, as lowercase hex.

    Returns
    -------
    dict of str to numpy.ndarray
        ``train_images``, ``train_labels``, ``val_*`` and ``test_*`` as stored.

    Raises
    ------
    DataError
        If the file is missing, larger than 64 MiB, or its bytes do not match
        ``sha256`` (the message names the file, never its full path).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Path(folder) / "copy.npz"
    ...     _ = path.write_bytes(b"not the file")
    ...     load_npz(path, sha256="0" * 64)
    Traceback (most recent call last):
    ...
    fedcare.errors.DataError: bundled file copy.npz does not match its recorded SHA-256; reinstall fedcare
    """
    try:
        size = path.stat().st_size
    except OSError:
        raise DataError(f"bundled file {path.name} is missing; reinstall fedcare") from None
    if size > _MAX_NPZ_BYTES:
        raise DataError(f"bundled file {path.name} has {size} bytes, more than {_MAX_NPZ_BYTES}; reinstall fedcare")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise DataError(f"bundled file {path.name} does not match its recorded SHA-256; reinstall fedcare")
    # allow_pickle=False: an .npz may hold pickled objects, and unpickling runs code.
    with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def shares_like(
    y: np.ndarray, parts: list[np.ndarray], y_reference: np.ndarray, *, rng: np.random.Generator
) -> list[np.ndarray]:
    """Deal the rows of ``y`` out to sites with the per-class shares that ``parts`` give ``y_reference``.

    Site ``k`` gets, of each class, about the share of that class's reference
    rows it holds; every row of ``y`` goes to exactly one site.

    Parameters
    ----------
    y : numpy.ndarray
        Labels of the split to divide (the official test or validation split).
    parts : list of numpy.ndarray
        Row indices of ``y_reference`` held by each site.
    y_reference : numpy.ndarray
        Labels of the split ``parts`` divide (the official training split).
    rng : numpy.random.Generator
        Chooses which rows of a class go where.

    Returns
    -------
    list of numpy.ndarray
        Sorted row indices of ``y``, one array per site.

    Examples
    --------
    >>> reference = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    >>> parts = [np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7])]  # site 0: every 0 and one 1 in 5
    >>> [p.tolist() for p in shares_like(np.array([0, 0, 1, 1, 1, 1]), parts, reference,
    ...                                  rng=np.random.default_rng(0))]
    [[0, 1, 4], [2, 3, 5]]
    """
    chosen: list[list[int]] = [[] for _ in parts]
    for label in np.unique(y):
        reference = np.array([np.count_nonzero(y_reference[part] == label) for part in parts], dtype=np.float64)
        shares = reference / reference.sum() if reference.sum() > 0 else np.full(len(parts), 1.0 / len(parts))
        rows = rng.permutation(np.flatnonzero(y == label))
        cuts = np.round(np.cumsum(shares)[:-1] * len(rows)).astype(int)
        for site, chunk in zip(chosen, np.split(rows, cuts), strict=True):
            site.extend(chunk.tolist())
    return [np.sort(np.asarray(site, dtype=np.int64)) for site in chosen]


class MedMNIST(BundledDataset):
    """A MedMNIST v2 28x28 dataset divided into sites (the shared loader).

    Subclasses set the file, its checksum, the classes and the channels;
    ``num_nodes`` sites (``site-0`` ...) get an IID or Dirichlet share of the
    official training split (``partition``, ``dirichlet_alpha``).
    """

    FILE: ClassVar[str]
    SHA256: ClassVar[str]
    CLASS_NAMES: ClassVar[tuple[str, ...]]
    CHANNELS: ClassVar[int] = 1
    DEFAULT_NODES: ClassVar[int] = 3
    SIZE: ClassVar[int] = 28

    def spec(self, config: DatasetConfig) -> DataSpec:
        shape = (self.CHANNELS, self.SIZE, self.SIZE)
        return DataSpec(
            num_features=int(np.prod(shape)),
            num_classes=len(self.CLASS_NAMES),
            class_names=self.CLASS_NAMES,
            feature_bounds=((0.0, 1.0),) * self.CHANNELS,
            input_shape=shape,
        )

    def site_names(self, config: DatasetConfig) -> tuple[str, ...]:
        return tuple(f"site-{i}" for i in range(config.num_nodes or self.DEFAULT_NODES))

    def path(self) -> Path:
        """Where the bundled file lies."""
        return _bundled_path("medmnist", self.FILE)

    def official_splits(self) -> dict[str, Split]:
        """The official ``train``, ``val`` and ``test`` splits, images as float32 ``(n, C, 28, 28)`` in [0, 1].

        Raises
        ------
        DataError
            If the bundled file fails its checksum or holds unexpected shapes.
        """
        arrays = load_npz(self.path(), sha256=self.SHA256)
        splits = {}
        for name in _SPLITS:
            images, labels = arrays[f"{name}_images"], arrays[f"{name}_labels"]
            expected = (self.SIZE, self.SIZE) if self.CHANNELS == 1 else (self.SIZE, self.SIZE, self.CHANNELS)
            if images.dtype != np.uint8 or images.shape[1:] != expected or labels.shape != (len(images), 1):
                raise DataError(
                    f"bundled file {self.FILE} holds {name} images of shape {images.shape[1:]} and dtype "
                    f"{images.dtype}, expected {expected} uint8; reinstall fedcare"
                )
            pixels = images[:, None] if self.CHANNELS == 1 else images.transpose(0, 3, 1, 2)
            x = np.ascontiguousarray(pixels, dtype=np.float32) / np.float32(255.0)
            splits[name] = Split(x=x, y=labels[:, 0].astype(np.int64))
        return splits

    def partition(self, y: np.ndarray, config: DatasetConfig) -> list[np.ndarray]:
        """Each site's rows of the official training split (fixed seed :data:`PARTITION_SEED`)."""
        rng = np.random.default_rng(PARTITION_SEED)
        count = len(self.site_names(config))
        if config.partition == "dirichlet":
            return dirichlet_partition(y, num_parts=count, alpha=config.dirichlet_alpha, rng=rng)
        return iid_partition(len(y), num_parts=count, rng=rng)

    def scan(self, site: str, split: str, x: np.ndarray, *, index: np.ndarray | None = None) -> np.ndarray:
        """A site's images as its scanner renders them; here, unchanged.

        ``index`` gives each image's row in the official ``split`` (default
        ``0 .. n - 1``), for scanners whose randomness is seeded per image.
        """
        return x

    def _divide(self, config: DatasetConfig, held_out: str) -> dict[str, SiteData]:
        official = self.official_splits()
        train = official["train"]
        parts = self.partition(train.y, config)
        other = official[held_out]
        rng = np.random.default_rng(np.random.SeedSequence(PARTITION_SEED, spawn_key=(_SPLITS.index(held_out),)))
        shares = shares_like(other.y, parts, train.y, rng=rng)
        spec = self.spec(config)
        sites = {}
        for name, rows, test_rows in zip(self.site_names(config), parts, shares, strict=True):
            site_train, site_test = train.take(rows), other.take(test_rows)
            sites[name] = SiteData(
                site=name,
                spec=spec,
                train=Split(self.scan(name, "train", site_train.x, index=rows), site_train.y),
                test=Split(self.scan(name, held_out, site_test.x, index=test_rows), site_test.y),
            )
        return sites

    def _load_all(self, config: DatasetConfig) -> dict[str, SiteData]:
        return self._divide(config, "test")

    def load_sites(self, config: DatasetConfig) -> dict[str, SiteData]:
        """Every site's data; with ``validation_fraction > 0`` the test split is the site's share of the official validation split.

        The fraction itself is not used: the official validation split fixes
        the size, and the training split stays whole.
        """
        return self._divide(config, "val" if config.validation_fraction > 0 else "test")


class BreastMNIST(MedMNIST):
    """BreastMNIST: breast ultrasound, binary (0 malignant, 1 normal or benign), ``num_nodes`` sites (default 3).

    Examples
    --------
    >>> from fedcare.plan import DatasetConfig
    >>> sites = BreastMNIST().load_sites(DatasetConfig(name="breast"))
    >>> sum(len(d.train) for d in sites.values()), sum(len(d.test) for d in sites.values())
    (546, 156)
    >>> sites["site-0"].train.x.shape[1:]
    (1, 28, 28)
    """

    FILE = "breastmnist.npz"
    SHA256 = "3a22d2a4625e7dd8903f0f59030e81a3d0c222bece2e5e10927456cb50efdec1"
    CLASS_NAMES = ("malignant", "normal or benign")
    info = DatasetInfo(
        name="breast",
        description="BreastMNIST (MedMNIST v2) 28x28 breast ultrasound, binary: 0 malignant, 1 normal or benign",
        sites="num_nodes synthetic sites, default 3 (IID or Dirichlet label skew)",
        patients=780,
        licence="CC BY 4.0",
        source="MedMNIST v2 (Yang et al. 2023) from BUSI (Al-Dhabyani et al. 2020)",
    )


class RetinaMNIST(MedMNIST):
    """RetinaMNIST: RGB fundus photographs, 5 ordinal diabetic-retinopathy grades, ``num_nodes`` sites (default 3).

    Examples
    --------
    >>> from fedcare.plan import DatasetConfig
    >>> spec = RetinaMNIST().spec(DatasetConfig(name="retina"))
    >>> spec.shape, spec.num_classes, spec.feature_bounds
    ((3, 28, 28), 5, ((0.0, 1.0), (0.0, 1.0), (0.0, 1.0)))
    """

    FILE = "retinamnist.npz"
    SHA256 = "254915f5f0a2074665c4676356824cf4ef4a3bcab233894b4bafcaf48962bd69"
    CLASS_NAMES = ("grade 0", "grade 1", "grade 2", "grade 3", "grade 4")
    CHANNELS = 3
    info = DatasetInfo(
        name="retina",
        description="RetinaMNIST (MedMNIST v2) 28x28 RGB fundus, 5 ordinal diabetic retinopathy grades",
        sites="num_nodes synthetic sites, default 3 (IID or Dirichlet label skew)",
        patients=1600,
        licence="CC BY 4.0",
        source="MedMNIST v2 (Yang et al. 2023) from DeepDRiD (Liu et al. 2022)",
    )


class PneumoniaMNIST(MedMNIST):
    """PneumoniaMNIST (0 normal, 1 pneumonia) over five simulated hospitals, each with its own 'scanner'.

    The official training split is divided among ``scanner-a`` ...
    ``scanner-e`` with Dirichlet label skew (``dirichlet_alpha``, default 0.5;
    always Dirichlet, whatever ``partition`` says; fixed partition seed;
    redrawn until every site has at least 200 training images), and
    every image of a site, training, validation and test alike, goes through
    that site's fixed transform (:attr:`SCANNERS`):

    * ``scanner-a``: brighter and harder, gamma 0.8 and contrast x1.25;
    * ``scanner-b``: blurred, Gaussian kernel of sigma 1 pixel;
    * ``scanner-c``: noisy, Gaussian noise of sd 0.06, seeded per image
      (from the site, the split and the image's row in the official split);
    * ``scanner-d``: low resolution, 2x2 block means then back to 28x28;
    * ``scanner-e``: darker and flatter, gamma 1.5 and contrast x0.7.

    Results are clipped to [0, 1].

    ``num_nodes`` unset or 5 gives these five hospitals. Any other multiple
    of 5 (up to 1,000) divides the official training split like the other
    MedMNIST datasets do (IID or Dirichlet, ``partition``, fixed seed) into
    that many smaller sites, spread evenly over the five scanners: site ``i``
    is ``scanner-<letter>-<i // 5>`` with scanner ``i mod 5``. This is for
    studies of many small sites (scale-out simulation): 1,000 sites hold 4
    or 5 training images each and most hold no test image.

    Examples
    --------
    >>> from fedcare.plan import DatasetConfig
    >>> sites = PneumoniaMNIST().load_sites(DatasetConfig(name="pneumonia"))
    >>> list(sites)
    ['scanner-a', 'scanner-b', 'scanner-c', 'scanner-d', 'scanner-e']
    >>> sum(len(d.train) for d in sites.values()), sum(len(d.test) for d in sites.values())
    (4708, 624)
    >>> PneumoniaMNIST().site_names(DatasetConfig(name="pneumonia", num_nodes=10))[:6]
    ('scanner-a-0', 'scanner-b-0', 'scanner-c-0', 'scanner-d-0', 'scanner-e-0', 'scanner-a-1')
    """

    FILE = "pneumoniamnist.npz"
    SHA256 = "e1792d3f03751cb101e99f19a63b3c1941436c988665f47853417b05be250cd8"
    CLASS_NAMES = ("normal", "pneumonia")
    #: Dirichlet draws are repeated until every site holds at least this many training images.
    MIN_SITE_IMAGES: ClassVar[int] = 200
    #: Site name -> what its scanner does to an image.
    SCANNERS: ClassVar[dict[str, str]] = {
        "scanner-a": "gamma 0.8, contrast x1.25",
        "scanner-b": "Gaussian blur, sigma 1 pixel",
        "scanner-c": "Gaussian noise, sd 0.06, seeded per image",
        "scanner-d": "low resolution: 2x2 block means, then nearest upsampling to 28x28",
        "scanner-e": "gamma 1.5, contrast x0.7",
    }
    info = DatasetInfo(
        name="pneumonia",
        description="PneumoniaMNIST (MedMNIST v2) 28x28 paediatric chest X-ray, binary: 0 normal, 1 pneumonia",
        sites="scanner-a ... scanner-e: 5 simulated hospitals, Dirichlet label skew, one image shift each "
        "(or num_nodes, a multiple of 5, smaller sites over the same scanners)",
        patients=5856,
        licence="CC BY 4.0",
        source="MedMNIST v2 (Yang et al. 2023) from Kermany et al. 2018",
    )

    #: The most sites ``num_nodes`` may ask for.
    MAX_NODES: ClassVar[int] = 1000

    def site_names(self, config: DatasetConfig) -> tuple[str, ...]:
        scanners = list(self.SCANNERS)
        count = config.num_nodes
        if count is None or count == len(scanners):
            return tuple(scanners)
        if count % len(scanners) or count > self.MAX_NODES:
            raise ConfigError(
                f"dataset 'pneumonia' spreads its sites evenly over {len(scanners)} scanners, so num_nodes must be "
                f"a multiple of {len(scanners)} up to {self.MAX_NODES}, got {count}; leave it unset for the "
                f"{len(scanners)} hospitals",
                field="plan.dataset.num_nodes",
            )
        return tuple(f"{scanners[i % len(scanners)]}-{i // len(scanners)}" for i in range(count))

    def scanner_of(self, site: str) -> str:
        """The scanner whose transform a site's images go through (``scanner-b-7`` -> ``scanner-b``).

        Raises
        ------
        ConfigError
            If ``site`` is not a site of this dataset.

        Examples
        --------
        >>> PneumoniaMNIST().scanner_of("scanner-b-7"), PneumoniaMNIST().scanner_of("scanner-c")
        ('scanner-b', 'scanner-c')
        """
        if site in self.SCANNERS:
            return site
        prefix, _, number = site.rpartition("-")
        if prefix in self.SCANNERS and number.isdigit():
            return prefix
        raise ConfigError(f"dataset 'pneumonia' has no site {site!r}", field="site")

    def partition(self, y: np.ndarray, config: DatasetConfig) -> list[np.ndarray]:
        if config.num_nodes not in (None, len(self.SCANNERS)):
            return super().partition(y, config)  # many small sites: IID or Dirichlet as ``partition`` says
        rng = np.random.default_rng(PARTITION_SEED)
        return dirichlet_partition(
            y, num_parts=len(self.SCANNERS), alpha=config.dirichlet_alpha, rng=rng, min_size=self.MIN_SITE_IMAGES
        )

    def scan(self, site: str, split: str, x: np.ndarray, *, index: np.ndarray | None = None) -> np.ndarray:
        """``x`` (``(n, 1, 28, 28)`` in [0, 1]) as the site's scanner renders it; a new array.

        ``index`` gives each image's row in the official ``split`` (default
        ``0 .. n - 1``): ``scanner-c`` seeds each image's noise from the site,
        the split and that row, so an image always gets the same noise.

        Raises
        ------
        ConfigError
            If ``site`` is not a site of this dataset (see :meth:`scanner_of`).

        Examples
        --------
        >>> x = np.full((1, 1, 28, 28), 0.5, np.float32)
        >>> round(float(PneumoniaMNIST().scan("scanner-e", "test", x).mean()), 3)
        0.397
        """
        site = self.scanner_of(site)
        if site == "scanner-a":
            out = _gamma_contrast(x, gamma=0.8, contrast=1.25)
        elif site == "scanner-b":
            out = _gaussian_blur(x, sigma=1.0)
        elif site == "scanner-c":
            scanner = list(self.SCANNERS).index(site)
            rows = np.arange(len(x)) if index is None else np.asarray(index, dtype=np.int64)
            noise = np.stack(
                [
                    np.random.default_rng([PARTITION_SEED, scanner, _SPLITS.index(split), int(row)])
                    .normal(0.0, 0.06, size=x.shape[1:])
                    .astype(np.float32)
                    for row in rows
                ]
            ) if len(x) else np.zeros_like(x)  # fmt: skip
            out = x + noise
        elif site == "scanner-d":
            n, c, h, w = x.shape
            blocks = x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
            out = blocks.repeat(2, axis=2).repeat(2, axis=3)
        else:
            out = _gamma_contrast(x, gamma=1.5, contrast=0.7)
        scanned: np.ndarray = np.clip(out, 0.0, 1.0).astype(np.float32)
        return scanned


def _gamma_contrast(x: np.ndarray, *, gamma: float, contrast: float) -> np.ndarray:
    """``x ** gamma``, then its contrast about 0.5 scaled by ``contrast``."""
    result: np.ndarray = (np.power(x, gamma) - 0.5) * contrast + 0.5
    return result


def _gaussian_blur(x: np.ndarray, *, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of the last two axes (radius 2 sigma, edges reflected)."""
    radius = max(1, int(round(2 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(radius, radius), (radius, radius)], mode="reflect")
    h, w = x.shape[-2:]
    rows = sum(t * padded[..., k : k + h, :] for k, t in enumerate(taps))
    blurred: np.ndarray = sum(t * rows[..., :, k : k + w] for k, t in enumerate(taps))
    return blurred
