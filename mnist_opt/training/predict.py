"""Classify image files with a logged or registered model (``mnist-opt predict``).

A model only knows images made the way its dataset was made, so any other picture is
converted first. MNIST (LeCun et al.): white ink on black, the digit's bounding box scaled
to 20 px on its longer side (anti-aliased) and placed in a 28×28 field so that its centre of
mass is at the centre. Fashion-MNIST differs: the item fills 28 px on its longer side and
its box is centred. A 28×28 image is taken to be in the dataset's format already.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_opt.data import CLASS_NAMES
from mnist_opt.errors import MnistOptError, PredictError

SIZE = 28
# (longer side of the ink's box, centred by centre of mass?) per dataset
FIT = {"mnist": (20, True), "fashion-mnist": (28, False)}
INK = 0.1  # a pixel is ink above this fraction of the brightest one: drops faint paper grain
NOISE = 5  # …and above this many standard deviations of the border's noise (photos, JPEG)
MIN_CONTRAST = 24  # grey levels between background and brightest ink, below which it is blank
SPECK = 0.01  # connected bits of ink with less than this share of all ink are dust, not digit
TOP_K = 3


@dataclass(frozen=True)
class Prediction:
    path: str
    class_index: int
    class_name: str
    probability: float
    top: list[tuple[str, float]]  # the TOP_K most probable classes, most probable first

    def line(self) -> str:
        top = ", ".join(f"{name} {p:.3f}" for name, p in self.top)
        head = f"{self.path}: {self.class_name} (p={self.probability:.3f})"
        return f"{head}   top-{len(self.top)}: {top}"


def _read_gray(path: Path) -> np.ndarray:
    """The image as float32 grey levels 0..255 (any format, mode or orientation PIL reads)."""
    if not path.is_file():
        raise PredictError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()  # decoding is lazy: a truncated file fails here, not later
            img = ImageOps.exif_transpose(img)  # phone photos are stored rotated
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        why = "unknown format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise PredictError(f"{path}: not a readable image ({why}); give a PNG, JPEG or another "
                           "format Pillow reads") from None
    if img.mode.startswith(("I", "F")):  # 16-bit or float grey: convert("L") would clip it
        gray = np.asarray(img, dtype=np.float32)
        return gray / 257 if gray.max() > 255 else gray
    if img.has_transparency_data:
        return _flatten_alpha(img.convert("RGBA"))
    return np.asarray(img.convert("L"), dtype=np.float32)


def _flatten_alpha(rgba: Image.Image) -> np.ndarray:
    """Composite onto a background that contrasts with the opaque pixels.

    Transparent pixels are background, whatever colour they store (drawing apps often store
    black there, the colour of the ink): black strokes go onto white, white ones onto black.
    """
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255
    gray = np.asarray(rgba.convert("RGB").convert("L"), dtype=np.float32)
    ink_tone = (gray * alpha).sum() / max(alpha.sum(), 1e-6)
    background = 255.0 if ink_tone < 128 else 0.0
    return gray * alpha + background * (1 - alpha)


def _background(gray: np.ndarray) -> tuple[float, float]:
    """Level and noise (robust standard deviation) of the outermost pixels, the background.

    Medians, so ink that touches the edge does not count.
    """
    edge = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    level = float(np.median(edge))
    return level, 1.4826 * float(np.median(np.abs(edge - level)))


def preprocess(path: str | Path, dataset: str = "mnist") -> np.ndarray:
    """One image file as the model's input: float32 (28, 28, 1) in [0, 1], white on black."""
    path = Path(path)
    gray = _read_gray(path)
    if _background(gray)[0] > 127:  # dark on light (paper, a drawing): the datasets are negated
        gray = 255 - gray
    level, noise = _background(gray)
    ink = np.clip(gray - level, 0, None)  # grey paper becomes black
    ink[ink < max(INK * ink.max(), NOISE * noise)] = 0
    if ink.max() < MIN_CONTRAST:
        raise PredictError(f"{path}: no digit/ink found (the image is blank or nearly uniform)")
    if gray.shape == (SIZE, SIZE):  # already the dataset's format: refitting would only blur it
        return (gray / 255)[..., None].astype(np.float32)
    ink = _drop_specks(ink)
    ink *= 255 / ink.max()  # a faint pencil stroke as bright as the datasets' ink
    rows, cols = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
    box = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    fit, by_mass = FIT[dataset]
    return (_place(_fit(box, fit), by_mass) / 255)[..., None].astype(np.float32)


def _drop_specks(ink: np.ndarray) -> np.ndarray:
    """Remove small islands of ink (noise, dust, JPEG artefacts): one would stretch the box.

    Islands, not a median filter: a one-pixel pen stroke in a large image must survive.
    """
    from scipy import ndimage  # scikit-learn's dependency

    labels, n = ndimage.label(ink > 0, structure=np.ones((3, 3)))
    if n < 2:
        return ink
    mass = ndimage.sum(ink, labels, index=np.arange(1, n + 1))
    keep = np.concatenate([[False], mass >= SPECK * mass.sum()])
    return np.where(keep[labels], ink, 0)


def _fit(box: np.ndarray, side: int) -> np.ndarray:
    """Scale so the longer side is ``side`` px, keeping the aspect ratio (Lanczos anti-aliasing)."""
    scale = side / max(box.shape)
    size = (max(1, round(box.shape[1] * scale)), max(1, round(box.shape[0] * scale)))
    small = Image.fromarray(box.astype(np.float32), mode="F").resize(size, Image.Resampling.LANCZOS)
    return np.rint(np.clip(np.asarray(small), 0, 255))  # integer levels, like the datasets


def _place(patch: np.ndarray, by_mass: bool) -> np.ndarray:
    """Paste into a black 28×28 canvas, its centre of mass (else box centre) at the centre.

    The offset is clamped so the whole patch stays on the canvas: a lopsided digit is a
    pixel or two off centre rather than cut.
    """
    h, w = patch.shape
    mass = patch.sum()
    if by_mass and mass > 0:  # MNIST's centres of mass lie at pixel (14, 14) on average
        cy = (patch.sum(axis=1) * np.arange(h)).sum() / mass
        cx = (patch.sum(axis=0) * np.arange(w)).sum() / mass
        top, left = round(SIZE / 2 - cy), round(SIZE / 2 - cx)
    else:
        top, left = (SIZE - h) // 2, (SIZE - w) // 2
    top, left = min(max(top, 0), SIZE - h), min(max(left, 0), SIZE - w)
    canvas = np.zeros((SIZE, SIZE), dtype=np.float32)
    canvas[top:top + h, left:left + w] = patch
    return canvas


def _study_dataset(name: str) -> str | None:
    from mnist_opt.study.config import find_study

    try:
        return find_study(name).dataset
    except MnistOptError:
        return None


def model_dataset(model_uri: str) -> str | None:
    """The dataset a model was trained on, or None if nothing says.

    A registered model is named after its study, so ``models:/NAME/…`` names the study file.
    Failing that (a study file given by path, a ``runs:/`` URI), the study run in the model's
    experiment logged the dataset as a parameter.
    """
    match = re.match(r"models:/([^/@]+)", model_uri)
    if match and (dataset := _study_dataset(match.group(1))):
        return dataset
    import mlflow

    try:
        client = mlflow.MlflowClient()
        run = client.get_run(mlflow.models.get_model_info(model_uri).run_id)
        studies = client.search_runs([run.info.experiment_id], "tags.`mnist_opt.kind` = 'study'",
                                     max_results=1)
    except Exception:  # noqa: BLE001 - a bad URI or store: load_model says what is wrong
        return None
    dataset = studies[0].data.params.get("dataset") if studies else None
    return dataset if dataset in CLASS_NAMES else None


def _tracking_store(model_uri: str) -> str:
    """Configure MLflow, but do not create an empty default store only to find no model in it."""
    from mnist_opt.tracking import runs as tracking

    default = tracking.DEFAULT_DIR / "mlflow.db"
    if (model_uri.startswith(("models:", "runs:")) and not os.environ.get("MLFLOW_TRACKING_URI")
            and not default.exists()):
        raise PredictError(f"cannot load model {model_uri!r}: no MLflow tracking store at "
                           f"{default.resolve()}; run in the directory where `make retrain` "
                           "wrote mlruns/, or set MLFLOW_TRACKING_URI")
    return tracking.configure()


def load_model(model_uri: str, store: str):
    """The Keras model behind an MLflow model URI in the tracking ``store``, or a PredictError
    that says where to look."""
    import mlflow

    try:
        return mlflow.keras.load_model(model_uri)
    except Exception as exc:  # noqa: BLE001 - MLflow, SQLAlchemy and Keras raise many kinds
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PredictError(
            f"cannot load model {model_uri!r} from the tracking store {store}: {first}. "
            "`make retrain NAME=<study>` registers models:/<study>/latest; see the registered "
            "models in the MLflow UI (make mlflow-ui), or set MLFLOW_TRACKING_URI") from None


def predict(model_uri: str, paths: Sequence[str | Path],
            dataset: str | None = None) -> list[Prediction]:
    """Classify image files in one batch; ``dataset`` picks the class names (default: the model's).

    The images are read before the model is loaded, so a bad file fails at once.
    """
    if not paths:
        return []
    store = _tracking_store(model_uri)
    known = dataset or model_dataset(model_uri)
    x = np.stack([preprocess(p, known or "mnist") for p in paths])
    model = load_model(model_uri, store)
    if known is None:  # said only now: a bad URI gets its own error, not this
        print(f"note: cannot tell which dataset {model_uri} was trained on; assuming mnist "
              "(choose with --dataset)", file=sys.stderr)
    # A direct call, not predict(): predict traces a new tf.function for every model.
    probs = np.asarray(model(x, training=False), dtype=np.float64)  # softmax outputs
    names = CLASS_NAMES[known or "mnist"]
    results = []
    for path, p in zip(paths, probs):
        order = np.argsort(p)[::-1][:TOP_K]
        results.append(Prediction(str(path), int(order[0]), names[order[0]], float(p[order[0]]),
                                  [(names[i], float(p[i])) for i in order]))
    return results
