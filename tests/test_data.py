"""IDX parsing, checksums, download and the stratified split, on hand-made and real files."""
from __future__ import annotations

import dataclasses
import functools
import gzip
import http.server
import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from mnist_opt import data
from mnist_opt.errors import DataError

REAL_MNIST = Path(os.environ["MNIST_OPT_DATA"]) / "mnist"
UNREACHABLE = ["http://127.0.0.1:9/"]  # the discard port: nothing listens, connection refused
TRAIN_COUNTS_HEAD = (5923, 6742)  # from shared/data/README.md


def _images_bytes(pixels: np.ndarray, count: int | None = None) -> bytes:
    n, rows, cols = pixels.shape
    return struct.pack(">IIII", 2051, n if count is None else count, rows, cols) + pixels.tobytes()


def _labels_bytes(labels: np.ndarray, count: int | None = None) -> bytes:
    return struct.pack(">II", 2049, len(labels) if count is None else count) + labels.tobytes()


def _write_gz(path: Path, raw: bytes) -> Path:
    path.write_bytes(gzip.compress(raw))
    return path


# --- IDX parsing -------------------------------------------------------------------------

def test_read_idx_gz_images(tmp_path: Path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    out = data.read_idx_gz(_write_gz(tmp_path / "img.gz", _images_bytes(pixels)))
    assert out.shape == (3, 28, 28)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, pixels)


def test_read_idx_gz_labels(tmp_path: Path):
    labels = np.array([7, 2, 1, 0, 4, 9], dtype=np.uint8)
    out = data.read_idx_gz(_write_gz(tmp_path / "lab.gz", _labels_bytes(labels)))
    assert out.shape == (6,)
    np.testing.assert_array_equal(out, labels)


def _bad_files() -> dict[str, bytes]:
    pixels = np.zeros((2, 28, 28), dtype=np.uint8)
    good = _images_bytes(pixels)
    return {
        "wrong_magic": struct.pack(">IIII", 2052, 2, 28, 28) + pixels.tobytes(),
        "truncated_payload": good[:-100],
        "header_says_more": _images_bytes(pixels, count=3),
        "payload_longer_than_header": _labels_bytes(np.arange(5, dtype=np.uint8), count=4),
        "too_short": b"\x00\x00\x08",
    }


@pytest.mark.parametrize("case", sorted(_bad_files()))
def test_read_idx_gz_rejects_bad_structure(tmp_path: Path, case: str):
    path = _write_gz(tmp_path / f"{case}.gz", _bad_files()[case])
    with pytest.raises(DataError) as err:
        data.read_idx_gz(path)
    assert str(path) in str(err.value)


def test_read_idx_gz_truncated_gzip(tmp_path: Path):
    pixels = np.random.default_rng(1).integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    full = gzip.compress(_images_bytes(pixels))
    path = tmp_path / "cut.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        data.read_idx_gz(path)
    assert str(path) in str(err.value)


def test_read_idx_gz_not_gzip(tmp_path: Path):
    path = tmp_path / "plain.gz"
    path.write_bytes(_labels_bytes(np.arange(3, dtype=np.uint8)))  # valid IDX, never gzipped
    with pytest.raises(DataError) as err:
        data.read_idx_gz(path)
    assert str(path) in str(err.value)


# --- checksums ---------------------------------------------------------------------------

def test_verify_detects_a_flipped_byte(tmp_path: Path):
    name = "t10k-labels-idx1-ubyte.gz"
    good = tmp_path / "good" / name
    bad = tmp_path / "bad" / name
    for p in (good, bad):
        p.parent.mkdir()
        shutil.copyfile(REAL_MNIST / name, p)
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))

    data.verify(good, "mnist")  # the untouched copy passes
    with pytest.raises(DataError) as err:
        data.verify(bad, "mnist")
    msg = str(err.value)
    assert str(bad) in msg
    assert data.sha256(bad) in msg
    assert data.KNOWN_SHA256["mnist"][name] in msg
    assert data.sha256(bad) != data.KNOWN_SHA256["mnist"][name]


# --- download ----------------------------------------------------------------------------

def test_download_failure_names_path_and_checksum(tmp_path: Path):
    target = tmp_path / "mnist"
    with pytest.raises(DataError) as err:
        data.download("mnist", target, mirrors=UNREACHABLE, timeout=2)
    msg = str(err.value)
    first = next(iter(data.FILES.values()))
    assert str(target / first) in msg
    assert data.KNOWN_SHA256["mnist"][first] in msg
    assert not (target / first).exists()


def test_load_missing_files_and_no_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """load() on an empty directory tries to download; every mirror failing is a DataError."""
    monkeypatch.setitem(data.MIRRORS, "mnist", UNREACHABLE)
    folder = tmp_path / "empty"
    with pytest.raises(DataError) as err:
        data.load("mnist", str(folder))
    msg = str(err.value)
    first = next(iter(data.FILES.values()))
    assert str(folder / first) in msg
    assert data.KNOWN_SHA256["mnist"][first] in msg


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass


def test_download_from_local_http_server(tmp_path: Path):
    handler = functools.partial(_QuietHandler, directory=str(REAL_MNIST))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        target = tmp_path / "mnist"
        data.download("mnist", target, mirrors=[f"http://127.0.0.1:{port}/"], timeout=10)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    for name in data.FILES.values():
        assert (target / name).is_file()
        data.verify(target / name, "mnist")
        assert data.sha256(target / name) == data.KNOWN_SHA256["mnist"][name]
    assert not list(target.glob("*.part"))


# --- real data and the split -------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist() -> data.Dataset:
    return data.load("mnist")


def test_load_real_mnist(mnist: data.Dataset):
    assert mnist.x_train.shape == (60000, 28, 28)
    assert mnist.x_test.shape == (10000, 28, 28)
    assert mnist.y_train.shape == (60000,)
    assert mnist.y_test.shape == (10000,)
    assert mnist.x_train.dtype == np.uint8
    assert mnist.y_train.dtype == np.uint8
    counts = np.bincount(mnist.y_train, minlength=10)
    assert tuple(counts[:2]) == TRAIN_COUNTS_HEAD
    assert counts.sum() == 60000
    assert mnist.class_names == [str(i) for i in range(10)]


def test_load_is_cached(mnist: data.Dataset):
    assert data.load("mnist") is mnist


def test_provenance_names_the_fashion_copy_only_for_its_files(tmp_path: Path):
    """The reference Fashion-MNIST copy is named as such; MNIST, and any other file under the
    same name (e.g. the official download), is just the dataset's name."""
    assert data.provenance("mnist") == "mnist"
    assert data.provenance("fashion-mnist").startswith("fashion-mnist (the offline copy")
    other = tmp_path / "fashion-mnist"
    other.mkdir()
    (other / data.FILES["train_images"]).write_bytes(b"not the copy")
    assert data.provenance("fashion-mnist", other) == "fashion-mnist"


def test_load_unknown_dataset():
    with pytest.raises(DataError, match="known: mnist, fashion-mnist"):
        data.load("kmnist")


def _assert_stratified(full_y: np.ndarray, sp: data.Split, tol: float = 0.01) -> None:
    """Each class's share within ``tol`` of the full set's; counts within 2 images of exact
    (a plain random split would miss the latter by tens of images)."""
    full = np.bincount(full_y, minlength=10) / len(full_y)
    for part in (sp.y_train, sp.y_val):
        counts = np.bincount(part, minlength=10)
        prop = counts / len(part)
        assert np.all(np.abs(prop - full) <= tol), (prop, full)
        assert np.all(np.abs(counts - full * len(part)) <= 2), (counts, full * len(part))


@pytest.fixture(scope="module")
def split48(mnist: data.Dataset) -> data.Split:
    return data.split(mnist, 0.1, 48)


def test_split_sizes_types_and_stratification(mnist: data.Dataset, split48: data.Split):
    sp = split48
    assert len(sp.y_train) == 54000 and len(sp.y_val) == 6000
    assert sp.x_train.shape == (54000, 28, 28, 1)
    assert sp.x_val.shape == (6000, 28, 28, 1)
    for x in (sp.x_train, sp.x_val):
        assert x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert x.max() == 1.0  # scaled by 255, not left in 0..255 or squashed
    _assert_stratified(mnist.y_train, sp)


def test_split_excludes_test_set(mnist: data.Dataset, split48: data.Split):
    assert {f.name for f in dataclasses.fields(data.Split)} == {"x_train", "y_train", "x_val", "y_val"}
    assert len(split48.y_train) + len(split48.y_val) == len(mnist.y_train)
    # same label multiset as the training set, so nothing came from the test set
    np.testing.assert_array_equal(
        np.bincount(np.concatenate([split48.y_train, split48.y_val]), minlength=10),
        np.bincount(mnist.y_train, minlength=10))


def test_split_is_deterministic_per_seed(mnist: data.Dataset, split48: data.Split):
    again = data.split(mnist, 0.1, 48)
    np.testing.assert_array_equal(again.y_train, split48.y_train)
    np.testing.assert_array_equal(again.x_val, split48.x_val)
    other = data.split(mnist, 0.1, 7)
    assert not np.array_equal(other.y_val, split48.y_val)
    assert not np.array_equal(other.x_val, split48.x_val)


def test_split_with_train_subset(mnist: data.Dataset):
    sp = data.split(mnist, 0.1, 48, train_subset=3000)
    assert len(sp.y_train) == 2700 and len(sp.y_val) == 300
    assert sp.x_train.shape == (2700, 28, 28, 1)
    _assert_stratified(mnist.y_train, sp)
    again = data.split(mnist, 0.1, 48, train_subset=3000)
    np.testing.assert_array_equal(again.x_train, sp.x_train)


def test_a_search_subset_has_fewer_training_images_and_the_whole_validation_split(
        mnist: data.Dataset, split48: data.Split):
    few = data.fewer_training_images(split48, 5000, 48)
    assert len(few.y_train) == 5000 and few.x_train.shape == (5000, 28, 28, 1)
    np.testing.assert_array_equal(few.y_val, split48.y_val)  # scored on the same images
    counts = np.bincount(few.y_train, minlength=10) / 5000
    np.testing.assert_allclose(counts, np.bincount(split48.y_train, minlength=10)
                               / len(split48.y_train), atol=2e-3)  # stratified
    val = {x.tobytes() for x in split48.x_val}  # drawn from the training part only
    assert not any(x.tobytes() in val for x in few.x_train[:500])
    for size in (None, 10**6):  # none asked, or more than there are: all of them
        assert len(data.fewer_training_images(split48, size, 48).y_train) == len(split48.y_train)
