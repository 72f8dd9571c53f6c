"""Lightning data modules: CIFAR-10, ImageNet (ImageFolder layout) and scikit-learn's bundled digits.

All three expose ``num_classes`` and ``input_shape`` so that a model can be built before ``Trainer.fit``. Distributed
sampling is left to Lightning (it wraps the loaders in a ``DistributedSampler`` under DDP); nothing here hand-writes
a sampler.

Nothing here downloads at import or construction time. ``CIFAR10DataModule`` downloads only when asked
(``download=True``); ``ImageNetDataModule`` never downloads; ``DigitsDataModule`` uses the copy of the data set that
ships inside scikit-learn, so it always works offline.
"""

from __future__ import annotations

import numbers
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import datasets, transforms
from torchvision.datasets.utils import download_and_extract_archive

from ._lightning import LightningDataModule

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "ImageNetDataModule",
]

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _pin_memory(requested: bool) -> bool:
    # Pinned memory only helps when batches go to an accelerator; on a CPU-only machine torch warns about it.
    return bool(requested) and torch.accelerator.is_available()


def _persistent(persistent_workers: bool | None, num_workers: int) -> bool:
    # DataLoader refuses persistent_workers=True with num_workers=0.
    if num_workers <= 0:
        return False
    return True if persistent_workers is None else bool(persistent_workers)


def _split_count(val_split: int | float, total: int) -> int:
    """Number of validation samples that ``val_split`` (an int count or a float fraction) asks for."""
    if isinstance(val_split, bool):
        raise TypeError("val_split must be an int count or a float fraction, not a bool")
    if isinstance(val_split, numbers.Integral):
        count = int(val_split)
    elif isinstance(val_split, numbers.Real):
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"val_split as a fraction must be in [0, 1), got {val_split}")
        count = int(round(float(val_split) * total))
    else:
        raise TypeError(f"val_split must be an int count or a float fraction, got {type(val_split).__name__}")
    if not 0 <= count < total:
        raise ValueError(f"val_split={val_split!r} asks for {count} of {total} training samples; it must leave some")
    return count


class _ImageDataModule(LightningDataModule):
    """Loader plumbing shared by the data modules: subclasses fill ``train_set``, ``val_set`` and (if
    it differs from the validation split) ``test_set`` in ``setup``."""

    drop_last_train = False  # ImageNet drops the last incomplete batch (BatchNorm over a tiny batch)
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called for this stage")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=_pin_memory(self.pin_memory),
            persistent_workers=_persistent(getattr(self, "persistent_workers", None), self.num_workers),
            drop_last=shuffle and self.drop_last_train,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (and, where configured, augmented) training batches."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches: the test set where there is one, else the validation split again."""
        return self._loader(self.test_set if self.test_set is not None else self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Same batches as :meth:`test_dataloader`."""
        return self.test_dataloader()


class _TransformedSubset(Dataset):
    """``Subset`` of a data set that returns untransformed samples, with its own transform."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Any) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.dataset[self.indices[index]]
        return self.transform(image), target


# What the CIFAR-10 python batches are made of: dicts, lists, strings, bytes and ints, and numpy arrays, which
# pickle rebuilds by calling these three. Anything else a file asks for is refused before it can run.
_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.empty(0))[0]
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _CIFARUnpickler(pickle.Unpickler):
    """Unpickler that admits only numpy array reconstruction: a pickle payload (``os.system``, ``eval``, any other
    callable) raises ``pickle.UnpicklingError`` instead of running."""

    def find_class(self, module: str, name: str) -> Any:
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"refers to {module}.{name}; a CIFAR-10 batch holds only dicts, lists, strings, numbers and numpy "
                f"arrays, so nothing else is loaded (a pickle that calls functions can run arbitrary code)"
            )
        return found


def _load_cifar_file(path: Path) -> dict[str, Any]:
    """One CIFAR-10 python file (a pickled dict, Python 2 strings read as latin-1), read with :class:`_CIFARUnpickler`.

    Raises:
        ValueError: naming the file when it is not a pickled dict of the CIFAR-10 kinds of values.
    """
    try:
        with open(path, "rb") as f:
            entry = _CIFARUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise ValueError(f"{path} is not a CIFAR-10 python batch: {type(err).__name__}: {err}") from err
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not a CIFAR-10 python batch: it holds a {type(entry).__name__}, not a dict")
    return entry


def _cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """Images ``(N, 3072)`` uint8 and labels of one data batch, checked against the CIFAR-10 format."""
    entry = _load_cifar_file(path)
    data, labels = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        shown = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {shown}")
    if not (isinstance(labels, list) and len(labels) == len(data) and all(isinstance(v, int) for v in labels)):
        raise ValueError(f"{path}: 'labels' must be a list of {len(data)} ints")
    return data, labels


class _CIFAR10Files(datasets.CIFAR10):
    """torchvision's CIFAR10 data set, read without executing anything the files might contain.

    torchvision opens the batches with plain ``pickle.load`` (a crafted ``cifar-10-batches-py`` folder would run code)
    and checks the MD5 of every file, which rejects copies placed by hand and small test fixtures in the same format.
    Here every file goes through :class:`_CIFARUnpickler` instead and is checked for the CIFAR-10 layout; the
    download path (``CIFAR10DataModule.prepare_data`` with ``download=True``) still verifies the archive's MD5, and
    :meth:`CIFAR10DataModule._check_files` reports missing files by name.
    """

    def __init__(self, root: str | os.PathLike, train: bool = True, transform: Any = None) -> None:
        datasets.VisionDataset.__init__(self, root, transform=transform)
        self.train = train
        folder = Path(self.root) / self.base_folder
        batches = [_cifar_batch(folder / name) for name, _ in (self.train_list if train else self.test_list)]
        self.data = np.vstack([data for data, _ in batches]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = [label for _, labels in batches for label in labels]
        self._load_meta()

    def _load_meta(self) -> None:
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        classes = _load_cifar_file(path).get(self.meta["key"])
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise ValueError(f"{path}: {self.meta['key']!r} must be a list of class names")
        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}


class CIFAR10DataModule(_ImageDataModule):
    """CIFAR-10 (Krizhevsky, 2009) through torchvision, with the standard augmentation.

    Training images get ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip``; all images are normalised with
    the CIFAR-10 per-channel mean and standard deviation. The data must be at ``<data_dir>/cifar-10-batches-py``
    (the extracted python batches); pass ``download=True`` to fetch it there.

    Args:
        data_dir: folder that holds (or will hold) ``cifar-10-batches-py``.
        batch_size: samples per batch (per process under DDP).
        num_workers: data-loading worker processes.
        download: download the data in :meth:`prepare_data` if it is missing. Nothing is downloaded otherwise.
        val_split: validation samples carved out of the 50,000 training images with ``seed``: an int count or a
            float fraction. ``0`` uses the test set for validation (the common CIFAR practice).
        seed: seed of the train/validation split.
        pin_memory: pin host memory (only takes effect when an accelerator is present).
        persistent_workers: keep workers alive between epochs; ``None`` means ``True`` when ``num_workers > 0``.
        augment: apply the training augmentation (crop + flip). ``False`` gives plain normalised training images.

    Example::

        dm = CIFAR10DataModule("data", batch_size=128, download=True)
        model = ImageClassifier("resnet20", num_classes=dm.num_classes)
        pl.Trainer(max_epochs=200).fit(model, datamodule=dm)
    """

    num_classes: int = 10
    input_shape: tuple[int, int, int] = (3, 32, 32)
    base_folder: str = _CIFAR10Files.base_folder

    def __init__(
        self,
        data_dir: str | os.PathLike = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        download: bool = False,
        val_split: int | float = 0,
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool | None = None,
        augment: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if val_split:
            _split_count(val_split, 50_000)  # early type and range check; the real count is checked in setup
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.val_split = val_split
        self.seed = seed
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.augment = augment
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def folder(self) -> Path:
        """Where the extracted python batches are expected: ``<data_dir>/cifar-10-batches-py``."""
        return self.data_dir / self.base_folder

    def train_transform(self) -> transforms.Compose:
        """Training transform: crop with 4-pixel padding and horizontal flip (if ``augment``), then normalise."""
        steps: list[Any] = []
        if self.augment:
            steps += [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        steps += [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        return transforms.Compose(steps)

    def eval_transform(self) -> transforms.Compose:
        """Evaluation transform: normalise only."""
        return transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])

    def _missing_files(self) -> list[str]:
        names = [name for name, _ in _CIFAR10Files.train_list + _CIFAR10Files.test_list]
        names.append(_CIFAR10Files.meta["filename"])
        return [name for name in names if not (self.folder / name).is_file()]

    def _check_files(self) -> None:
        missing = self._missing_files()
        if missing:
            raise FileNotFoundError(
                f"CIFAR-10 not found: looked in {self.folder} and it lacks {', '.join(missing)}. "
                f"Pass download=True (or --download in the example scripts) to download it there, or place the "
                f"extracted python batches (data_batch_1..5, test_batch, batches.meta from cifar-10-python.tar.gz) "
                f"in that folder."
            )

    def prepare_data(self) -> None:
        """Download the data when ``download=True`` and it is missing; otherwise check that it is there."""
        if self.download and self._missing_files():
            # torchvision's own download: fetches cifar-10-python.tar.gz, checks its MD5 and extracts it
            cifar = datasets.CIFAR10
            download_and_extract_archive(cifar.url, str(self.data_dir), filename=cifar.filename, md5=cifar.tgz_md5)
        self._check_files()

    def setup(self, stage: str | None = None) -> None:
        """Open the data sets and carve the validation split (every process calls this)."""
        self._check_files()
        root = str(self.data_dir)
        if stage in (None, "fit", "validate"):
            if self.val_split:
                full = _CIFAR10Files(root, train=True)  # one copy of the images, two views with their own transform
                n_val = _split_count(self.val_split, len(full))
                order = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed)).tolist()
                self.train_set = _TransformedSubset(full, order[n_val:], self.train_transform())
                self.val_set = _TransformedSubset(full, order[:n_val], self.eval_transform())
            else:
                self.train_set = _CIFAR10Files(root, train=True, transform=self.train_transform())
                self.val_set = _CIFAR10Files(root, train=False, transform=self.eval_transform())
        if stage in (None, "test", "predict"):
            if not self.val_split and self.val_set is not None:
                self.test_set = self.val_set  # the same test images: open them once
            else:
                self.test_set = _CIFAR10Files(root, train=False, transform=self.eval_transform())


def _class_folders(path: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith("."))


class _ImageFolder(datasets.ImageFolder):
    """``ImageFolder`` that skips hidden folders (``.ipynb_checkpoints`` and the like) when listing classes."""

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = _class_folders(Path(directory))
        if not classes:
            raise FileNotFoundError(f"No class folders in {directory}")
        return classes, {name: i for i, name in enumerate(classes)}


class ImageNetDataModule(_ImageDataModule):
    """ImageNet-style data in the ``ImageFolder`` layout: ``<data_dir>/train/<class>/*.JPEG`` and ``val/...``.

    Training images get ``RandomResizedCrop(image_size)`` and a horizontal flip; validation images are resized so
    that the short side is ``image_size / 0.875`` (256 for 224) and centre-cropped to ``image_size``. Both are
    normalised with the ImageNet mean and standard deviation. The class list (and ``num_classes``) comes from the
    sub-folders of ``train/``; ``val/`` must have the same class folders (use a script such as
    ``valprep.sh`` to sort the flat ILSVRC validation images into folders). The validation split doubles as the test
    split.

    Args:
        data_dir: folder with ``train/`` and ``val/``.
        batch_size: samples per batch (per process under DDP).
        num_workers: data-loading worker processes.
        image_size: side of the square crops fed to the network.
        crop_fraction: validation resize is ``round(image_size / crop_fraction)``.
        pin_memory: pin host memory (only takes effect when an accelerator is present).
        persistent_workers: keep workers alive between epochs; ``None`` means ``True`` when ``num_workers > 0``.

    Example::

        dm = ImageNetDataModule("/datasets/imagenet", batch_size=256, num_workers=8)
        model = ImageClassifier("ghostnet_100", num_classes=dm.num_classes, lr=0.4)
        pl.Trainer(max_epochs=90, accelerator="gpu", devices=8, strategy="ddp").fit(model, datamodule=dm)
    """

    drop_last_train = True

    def __init__(
        self,
        data_dir: str | os.PathLike,
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: int = 224,
        crop_fraction: float = 0.875,
        pin_memory: bool = True,
        persistent_workers: bool | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.resize_size = int(round(image_size / crop_fraction))
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._classes: list[str] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(3, image_size, image_size)``."""
        return (3, self.image_size, self.image_size)

    def _folder(self, split: str) -> Path:
        path = self.data_dir / split
        if not path.is_dir():
            raise FileNotFoundError(
                f"ImageNet {split} folder not found: looked for {path}. {type(self).__name__} expects the "
                f"ImageFolder layout {self.data_dir}/train/<class>/<image> and {self.data_dir}/val/<class>/<image> "
                f"(it never downloads; ImageNet must be obtained from image-net.org and extracted there)."
            )
        return path

    @property
    def classes(self) -> list[str]:
        """Class names: the sub-folders of ``train/``, sorted (the order ``ImageFolder`` uses)."""
        if self._classes is None:
            classes = _class_folders(self._folder("train"))
            if not classes:
                raise FileNotFoundError(f"No class folders in {self.data_dir / 'train'}")
            self._classes = classes
        return self._classes

    @property
    def num_classes(self) -> int:
        """Number of class folders in ``train/``."""
        return len(self.classes)

    def train_transform(self) -> transforms.Compose:
        """Random-resized crop to ``image_size``, horizontal flip, normalise."""
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(self.image_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def eval_transform(self) -> transforms.Compose:
        """Resize the short side to ``image_size / crop_fraction``, centre-crop ``image_size``, normalise."""
        return transforms.Compose(
            [
                transforms.Resize(self.resize_size),
                transforms.CenterCrop(self.image_size),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def prepare_data(self) -> None:
        """Check that ``train/`` and ``val/`` exist (nothing is downloaded)."""
        self._folder("train")
        self._folder("val")

    def setup(self, stage: str | None = None) -> None:
        """Index the image folders; checks that ``val/`` has the same classes as ``train/``."""
        classes = self.classes
        val_classes = _class_folders(self._folder("val"))
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))[:5]
            only_val = sorted(set(val_classes) - set(classes))[:5]
            raise ValueError(
                f"{self.data_dir / 'val'} has {len(val_classes)} class folders, {self.data_dir / 'train'} has "
                f"{len(classes)}; they must match (only in train: {only_train}, only in val: {only_val})"
            )
        if stage in (None, "fit"):
            self.train_set = _ImageFolder(str(self._folder("train")), transform=self.train_transform())
        self.val_set = _ImageFolder(str(self._folder("val")), transform=self.eval_transform())


class _RandomShift(Dataset):
    """Random translation by up to ``pad`` pixels (zero padding, then a random crop) on an image tensor data set."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, pad: int, fill: Sequence[float]) -> None:
        self.images = images
        self.targets = targets
        self.pad = pad
        self.fill = torch.as_tensor(fill, dtype=images.dtype).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.pad > 0:
            _, h, w = image.shape
            dy, dx = torch.randint(-self.pad, self.pad + 1, (2,)).tolist()
            shifted = self.fill.expand_as(image).clone()
            ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
            xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
            shifted[:, yd, xd] = image[:, ys, xs]
            image = shifted
        return image, self.targets[index]


def _load_digits() -> Any:
    """scikit-learn's bundled digits (1,797 8x8 images, no download).

    Raises:
        ImportError: scikit-learn is not installed, naming the extra that brings it.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "DigitsDataModule needs scikit-learn (its bundled digits data): pip install 'lightning-cheapconv[digits]'"
        ) from err
    return load_digits()


class DigitsDataModule(_ImageDataModule):
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 images), shaped like CIFAR for the CIFAR models.

    The only real image data set that is always available offline. Pixel values 0..16 are scaled to [0, 1], resized
    to ``image_size`` x ``image_size`` with bilinear interpolation, repeated to 3 channels and normalised with the
    mean and standard deviation of the training split. The train/validation split is stratified and fixed by
    ``seed``; the validation split doubles as the test split. All tensors are built once in :meth:`setup`.

    Args:
        batch_size: samples per batch.
        num_workers: data-loading workers (0 is fastest: the data is a few MB of tensors in memory).
        image_size: side of the square images (32 matches the CIFAR models).
        val_fraction: fraction of the 1,797 images held out for validation/test (stratified).
        train_subset: use only the first N images of the (shuffled) training split: a harder reduced-data task.
        seed: seed of the split (and nothing else).
        augment: random shifts of up to ``image_size // 8`` pixels on training images (off by default; no flips,
            they would change the digits).
        pin_memory: pin host memory (only takes effect when an accelerator is present).

    Example::

        dm = DigitsDataModule(batch_size=64, train_subset=500)
        model = ImageClassifier("resnet20", num_classes=dm.num_classes, lr=0.05)
        pl.Trainer(max_epochs=15).fit(model, datamodule=dm)
    """

    num_classes: int = 10

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int = 32,
        val_fraction: float = 0.25,
        train_subset: int | None = None,
        seed: int = 0,
        augment: bool = False,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if train_subset is not None and train_subset < 1:
            raise ValueError(f"train_subset must be a positive int or None, got {train_subset}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.train_subset = train_subset
        self.seed = seed
        self.augment = augment
        self.pin_memory = pin_memory
        self.mean: tuple[float, float, float] | None = None
        self.std: tuple[float, float, float] | None = None
        self.train_set: Dataset | None = None
        self.val_set: TensorDataset | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(3, image_size, image_size)``."""
        return (3, self.image_size, self.image_size)

    def split_indices(self) -> tuple[list[int], list[int]]:
        """Indices (into scikit-learn's order) of the training and validation images, after ``train_subset``."""
        return self._split(_load_digits().target)

    def _split(self, target: Any) -> tuple[list[int], list[int]]:
        from sklearn.model_selection import train_test_split

        train_idx, val_idx = train_test_split(
            list(range(len(target))), test_size=self.val_fraction, stratify=target, random_state=self.seed
        )
        if self.train_subset is not None:
            if self.train_subset > len(train_idx):
                raise ValueError(f"train_subset={self.train_subset} exceeds the {len(train_idx)} training images")
            train_idx = train_idx[: self.train_subset]
        return list(train_idx), list(val_idx)

    def setup(self, stage: str | None = None) -> None:
        """Build the normalised image tensors once (a no-op on later calls)."""
        if self.val_set is not None:
            return
        digits = _load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # (N, 1, 8, 8)
        if self.image_size != images.shape[-1]:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        targets = torch.as_tensor(digits.target, dtype=torch.long)
        train_idx, val_idx = self._split(digits.target)
        train_idx_t, val_idx_t = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
        train_images = images[train_idx_t]
        mean = train_images.mean().item()
        std = train_images.std().item()
        self.mean, self.std = (mean,) * 3, (std,) * 3
        images = images.sub_(mean).div_(std).expand(-1, 3, -1, -1).contiguous()
        train_images, train_targets = images[train_idx_t], targets[train_idx_t]
        if self.augment:
            self.train_set = _RandomShift(train_images, train_targets, self.image_size // 8, fill=[-mean / std] * 3)
        else:
            self.train_set = TensorDataset(train_images, train_targets)
        self.val_set = TensorDataset(images[val_idx_t], targets[val_idx_t])
