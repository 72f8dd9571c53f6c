"""Data modules on small data written to tmp_path (CIFAR-10 pickles, an ImageFolder) and on sklearn's digits."""

from __future__ import annotations

import io
import os
import pickle
import shlex
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

import lightning_cheapconv.data as data_module
from lightning_cheapconv.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CIFAR10DataModule,
    DigitsDataModule,
    ImageNetDataModule,
)

# ---------------------------------------------------------------------------------------------------- fake CIFAR-10


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING opcodes), as in the real CIFAR-10 files pickled by Python 2.

    torchvision reads them with ``encoding="latin1"`` (keys come back as ``"data"``, ``"labels"``); read with
    ``encoding="bytes"`` they show ``b"data"``, ``b"labels"``.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _dump_py2(obj: object, path: Path) -> None:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue())


CHANNEL_VALUES = ((0, 128, 255), (51, 102, 204))  # per-channel pixel values of even / odd test images


def _cifar_images(n: int, offset: int) -> tuple[np.ndarray, list[int]]:
    """``n`` images (N, 3072) uint8, constant per channel, and labels ``(offset + i) % 10``."""
    data = np.empty((n, 3, 32, 32), dtype=np.uint8)
    for i in range(n):
        for c, value in enumerate(CHANNEL_VALUES[i % 2]):
            data[i, c] = value
    return data.reshape(n, 3072), [(offset + i) % 10 for i in range(n)]


def write_fake_cifar(root: Path, per_batch: int = 4, n_test: int = 6) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(1, 6):
        data, labels = _cifar_images(per_batch, offset=b * per_batch)
        # the training images carry their global index in pixel (0, 0, 0) so that splits can be traced
        for i in range(per_batch):
            data[i, 0] = (b - 1) * per_batch + i
        _dump_py2(
            {b"batch_label": f"training batch {b} of 5".encode(), b"data": data, b"labels": labels},
            folder / f"data_batch_{b}",
        )
    data, labels = _cifar_images(n_test, offset=0)
    _dump_py2({b"batch_label": b"testing batch 1 of 1", b"data": data, b"labels": labels}, folder / "test_batch")
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump_py2({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, folder / "batches.meta")
    return folder


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    write_fake_cifar(tmp_path)
    return tmp_path


def test_fake_cifar_has_the_real_format(cifar_root: Path) -> None:
    with open(cifar_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) >= {b"data", b"labels"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (4, 3072)


def test_cifar_loaders_shapes_and_normalization(cifar_root: Path) -> None:
    dm = CIFAR10DataModule(cifar_root, batch_size=4, num_workers=0)
    assert dm.num_classes == 10 and dm.input_shape == (3, 32, 32)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.val_set) == 6  # val_split=0: the test set is the validation set
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (4,) and y.dtype == torch.long

    x, y = next(iter(dm.val_dataloader()))
    assert y.tolist() == [0, 1, 2, 3]
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    for i in range(4):
        raw = torch.tensor(CHANNEL_VALUES[i % 2], dtype=torch.float32).view(3, 1, 1) / 255
        torch.testing.assert_close(x[i], ((raw - mean) / std).expand(3, 32, 32))

    dm.setup("test")
    x_test, y_test = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(x_test, x)
    assert len(dm.test_set) == 6


def test_cifar_training_augmentation_pads_and_flips(cifar_root: Path) -> None:
    dm = CIFAR10DataModule(cifar_root, batch_size=20, num_workers=0)
    dm.setup("fit")
    torch.manual_seed(0)
    x, _ = next(iter(dm.train_dataloader()))
    zero = -torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)  # a padded (black) pixel after normalisation
    border = torch.cat([x[..., :4, :].flatten(2), x[..., -4:, :].flatten(2)], dim=2)  # the 4-pixel crop margins
    assert torch.isclose(border, zero.view(1, 3, 1)).all(dim=1).any(), "no padding seen in 20 random crops"
    plain = CIFAR10DataModule(cifar_root, batch_size=20, num_workers=0, augment=False)
    plain.setup("fit")
    x, _ = next(iter(plain.train_dataloader()))
    assert not torch.isclose(x, zero.view(1, 3, 1, 1)).all(dim=1).any()


@pytest.mark.parametrize("val_split, n_val", [(5, 5), (0.25, 5), (1, 1)])
def test_cifar_val_split(cifar_root: Path, val_split: int | float, n_val: int) -> None:
    dm = CIFAR10DataModule(cifar_root, batch_size=32, num_workers=0, val_split=val_split, seed=3)
    dm.setup("fit")
    assert len(dm.val_set) == n_val and len(dm.train_set) == 20 - n_val
    x_val, _ = next(iter(dm.val_dataloader()))
    ids_val = (x_val[:, 0, 0, 0] * CIFAR10_STD[0] + CIFAR10_MEAN[0]) * 255  # un-augmented: pixel (0,0,0) = index
    ids_val = ids_val.round().long().tolist()
    plain = CIFAR10DataModule(cifar_root, batch_size=32, num_workers=0, val_split=val_split, seed=3, augment=False)
    plain.setup("fit")
    x_train, _ = next(iter(plain.train_dataloader()))
    ids_train = ((x_train[:, 0, 0, 0] * CIFAR10_STD[0] + CIFAR10_MEAN[0]) * 255).round().long().tolist()
    assert sorted(ids_val + ids_train) == list(range(20))  # disjoint, and together all training images

    again = CIFAR10DataModule(cifar_root, num_workers=0, val_split=val_split, seed=3)
    again.setup("fit")
    assert again.val_set.indices == dm.val_set.indices
    # the test split stays the official test set
    dm.setup("test")
    assert len(dm.test_set) == 6


def test_cifar_val_split_depends_on_seed(cifar_root: Path) -> None:
    splits = set()
    for seed in range(4):
        dm = CIFAR10DataModule(cifar_root, num_workers=0, val_split=5, seed=seed)
        dm.setup("fit")
        splits.add(tuple(dm.val_set.indices))
    assert len(splits) > 1


@pytest.mark.parametrize("val_split", [20, 25, 1.0, -1, True, "5"])
def test_cifar_bad_val_split(cifar_root: Path, val_split: object) -> None:
    with pytest.raises((ValueError, TypeError)):  # bad types and fractions at once, counts when the data is seen
        CIFAR10DataModule(cifar_root, num_workers=0, val_split=val_split).setup("fit")


def test_cifar_missing_data_error_names_the_path(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(tmp_path / "nowhere", num_workers=0)
    expected = str(tmp_path / "nowhere" / "cifar-10-batches-py")
    for call in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError) as info:
            call()
        message = str(info.value)
        assert expected in message
        assert "download=True" in message and "--download" in message


def test_cifar_missing_one_file_is_named(cifar_root: Path) -> None:
    (cifar_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        CIFAR10DataModule(cifar_root, num_workers=0).setup("fit")


class _Payload:
    """Pickles as a call of ``os.system`` that creates ``marker``: what a malicious batch file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (shlex.join([sys.executable, "-c", f"open({str(self.marker)!r}, 'w').close()"]),)


@pytest.mark.parametrize("target", ["data_batch_2", "test_batch", "batches.meta"])
def test_cifar_pickle_payload_is_refused_without_running(cifar_root: Path, tmp_path: Path, target: str) -> None:
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(live)))  # the payload is real: a plain unpickler runs it
    assert live.exists()

    marker = tmp_path / "marker"
    folder = cifar_root / "cifar-10-batches-py"
    _dump_py2({b"data": _Payload(marker), b"labels": [0]}, folder / target)
    dm = CIFAR10DataModule(cifar_root, batch_size=4, num_workers=0)
    dm.prepare_data()  # only checks that the files are there
    with pytest.raises(ValueError, match=rf"{target} is not a CIFAR-10 python batch: .*refers to (posix|nt)\.system"):
        dm.setup()
    assert not marker.exists()


@pytest.mark.parametrize(
    "entry,match",
    [
        ([1, 2], "holds a list, not a dict"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, r"'data' must be a uint8 array.*float32"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "'labels' must be a list of 2 ints"),
    ],
)
def test_cifar_wrong_contents_are_named(cifar_root: Path, entry: object, match: str) -> None:
    _dump_py2(entry, cifar_root / "cifar-10-batches-py" / "data_batch_1")
    with pytest.raises(ValueError, match=rf"data_batch_1.*{match}"):
        CIFAR10DataModule(cifar_root, num_workers=0).setup("fit")


def test_cifar_download_skipped_when_present(cifar_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download")

    monkeypatch.setattr(data_module, "download_and_extract_archive", no_network)
    CIFAR10DataModule(cifar_root, num_workers=0, download=True).prepare_data()


def test_cifar_download_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(url: str, root: str, filename: str, md5: str) -> None:
        calls.append((url, root, filename, md5))
        write_fake_cifar(Path(root))

    monkeypatch.setattr(data_module, "download_and_extract_archive", fake_download)
    with pytest.raises(FileNotFoundError):
        CIFAR10DataModule(tmp_path, num_workers=0).prepare_data()
    assert not calls
    dm = CIFAR10DataModule(tmp_path, num_workers=0, download=True)
    dm.prepare_data()
    assert calls == [(datasets.CIFAR10.url, str(tmp_path), "cifar-10-python.tar.gz", datasets.CIFAR10.tgz_md5)]
    dm.setup("fit")
    assert len(dm.train_set) == 20


def test_cifar_loader_options(cifar_root: Path) -> None:
    dm = CIFAR10DataModule(cifar_root, batch_size=4, num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers
    assert loader.pin_memory == torch.accelerator.is_available()
    dm0 = CIFAR10DataModule(cifar_root, batch_size=4, num_workers=0)
    dm0.setup("fit")
    assert not dm0.val_dataloader().persistent_workers


# ---------------------------------------------------------------------------------------------------- ImageFolder


def write_image_folder(root: Path, classes: tuple[str, ...] = ("bird", "cat", "dog"), per_class: int = 2) -> Path:
    for split, n in (("train", per_class), ("val", 1)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                h, w = 40 + 7 * i, 52 - 5 * c
                yy, xx, cc = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
                array = (2 * xx + yy + 30 * cc + 10 * c).astype(np.uint8)  # smooth, so resizing is predictable
                Image.fromarray(array).save(root / split / name / f"{name}_{i}.png")
    return root


def test_imagenet_loaders(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    dm = ImageNetDataModule(tmp_path, batch_size=2, num_workers=0, image_size=32)
    assert dm.num_classes == 3 and dm.classes == ["bird", "cat", "dog"]
    assert dm.input_shape == (3, 32, 32) and dm.resize_size == 37  # round(32 / 0.875)
    assert ImageNetDataModule(tmp_path).resize_size == 256
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.val_set) == 3
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and all(x.shape == (2, 3, 32, 32) for x, _ in batches)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == [0, 0, 1, 1, 2, 2]

    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 1]
    # centre crop of the resized image, normalised with the ImageNet statistics
    image = Image.open(tmp_path / "val" / "bird" / "bird_0.png").convert("RGB")
    w, h = image.size
    image = image.resize((37, round(37 * h / w)) if w < h else (round(37 * w / h), 37), Image.BILINEAR)
    raw = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    top, left = round((raw.shape[1] - 32) / 2), round((raw.shape[2] - 32) / 2)
    expected = (raw[:, top : top + 32, left : left + 32] - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(3, 1, 1)
    assert (x[0] - expected).abs().max() < 0.05  # PIL and torchvision resizing differ only by rounding

    dm.setup("test")
    x_test, _ = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(x_test, x)


def test_imagenet_missing_folders(tmp_path: Path) -> None:
    dm = ImageNetDataModule(tmp_path / "imagenet", num_workers=0)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "imagenet" / "train")):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match="train"):
        _ = dm.num_classes
    (tmp_path / "imagenet" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "imagenet" / "val")):
        dm.setup("fit")


def test_imagenet_class_mismatch(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    (tmp_path / "val" / "emu").mkdir()
    with pytest.raises(ValueError, match="emu"):
        ImageNetDataModule(tmp_path, num_workers=0).setup("fit")


# ---------------------------------------------------------------------------------------------------- digits


def test_digits_shapes_and_split() -> None:
    dm = DigitsDataModule(batch_size=64)
    assert dm.num_classes == 10 and dm.input_shape == (3, 32, 32)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert len(dm.val_set) == 450  # ceil(0.25 * 1797), as scikit-learn rounds the test share
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    torch.testing.assert_close(x[:, 0], x[:, 1])
    torch.testing.assert_close(x[:, 0], x[:, 2])
    train_x = dm.train_set.tensors[0]
    assert abs(train_x.mean().item()) < 1e-4 and abs(train_x.std().item() - 1) < 1e-3
    # stratified: every class in the validation split, in proportion
    counts = torch.bincount(dm.val_set.tensors[1], minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47
    x_test, _ = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(x_test, next(iter(dm.val_dataloader()))[0])


def test_digits_images_are_the_real_digits_resized() -> None:
    from sklearn.datasets import load_digits

    dm = DigitsDataModule(image_size=8)
    dm.setup()
    train_idx, _ = dm.split_indices()
    raw = torch.as_tensor(load_digits().images[train_idx[:5]], dtype=torch.float32) / 16
    mean, std = dm.mean[0], dm.std[0]
    torch.testing.assert_close(dm.train_set.tensors[0][:5, 0], (raw - mean) / std)
    assert 0 < mean < 1

    big = DigitsDataModule(image_size=32)
    big.setup()
    assert big.train_set.tensors[0].shape[1:] == (3, 32, 32)
    upsampled = torch.nn.functional.interpolate(raw.unsqueeze(1), size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(big.train_set.tensors[0][:5, :1], (upsampled - big.mean[0]) / big.std[0])


def test_digits_determinism_and_seed() -> None:
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert torch.equal(a.val_set.tensors[1], b.val_set.tensors[1])
    assert a.split_indices() != c.split_indices()
    train_idx, val_idx = a.split_indices()
    assert not set(train_idx) & set(val_idx)


def test_digits_train_subset() -> None:
    full, sub = DigitsDataModule(seed=2), DigitsDataModule(seed=2, train_subset=100)
    full.setup()
    sub.setup()
    assert len(sub.train_set) == 100
    assert len(sub.val_set) == len(full.val_set)
    assert sub.split_indices()[0] == full.split_indices()[0][:100]
    assert torch.equal(sub.train_set.tensors[1], full.train_set.tensors[1][:100])
    with pytest.raises(ValueError, match="train_subset"):
        DigitsDataModule(train_subset=5000).setup()
    with pytest.raises(ValueError):
        DigitsDataModule(train_subset=0)


def _shift(image: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2), value=fill)
    h, w = image.shape[-2:]
    return padded[:, 2 - dy : 2 - dy + h, 2 - dx : 2 - dx + w]


def test_digits_augment() -> None:
    dm = DigitsDataModule(batch_size=16, augment=True, image_size=16)  # shifts of up to 16 // 8 = 2 pixels
    dm.setup()
    torch.manual_seed(0)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 16, 16)
    fill = -dm.mean[0] / dm.std[0]  # a blank (0) pixel after normalisation
    shifts = set()
    for i in range(30):
        original, augmented = dm.train_set.images[i], dm.train_set[i][0]
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.allclose(_shift(original, dy, dx, fill), augmented)
        ]
        assert matches, "an augmented image is not a shift of its original"
        shifts.add(matches[0])
    assert len(shifts) > 3
    assert not DigitsDataModule(augment=False).augment


# ---------------------------------------------------------------------------------------------------- in a Trainer


@pytest.mark.parametrize("kind", ["cifar", "imagenet"])
def test_data_modules_in_a_trainer(tmp_path: Path, kind: str) -> None:
    import pytorch_lightning as pl
    from torch import nn

    from lightning_cheapconv.module import ImageClassifier

    if kind == "cifar":
        dm: pl.LightningDataModule = CIFAR10DataModule(write_fake_cifar(tmp_path).parent, 4, num_workers=0, val_split=4)
    else:
        dm = ImageNetDataModule(write_image_folder(tmp_path), batch_size=2, num_workers=0, image_size=32)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, dm.num_classes))
    model = ImageClassifier(backbone, num_classes=dm.num_classes, scheduler="none")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert {"val/acc", "val/loss"} <= set(trainer.callback_metrics)
    assert trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"] >= 0


def test_digits_without_scikit_learn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # what an environment without scikit-learn imports
    with pytest.raises(ImportError, match=r"DigitsDataModule needs scikit-learn .*lightning-cheapconv\[digits\]"):
        DigitsDataModule().setup("fit")
