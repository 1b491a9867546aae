"""`mnist-opt predict`: images converted the way MNIST was made, classified by a logged model."""
from __future__ import annotations

import re
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_opt import data
from mnist_opt.errors import PredictError
from mnist_opt.training.predict import preprocess

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mnist() -> data.Dataset:
    return data.load("mnist")


def _centre_of_mass(x: np.ndarray) -> tuple[float, float]:
    img = x[..., 0]
    rows, cols = np.arange(img.shape[0]), np.arange(img.shape[1])
    return (img.sum(axis=1) @ rows) / img.sum(), (img.sum(axis=0) @ cols) / img.sum()


def _box(x: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(x[..., 0].any(axis=1))[0], np.nonzero(x[..., 0].any(axis=0))[0]
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def _like(x: np.ndarray, digit: np.ndarray) -> float:
    """Correlation of a preprocessed image with the MNIST original it was made from, at the
    best shift of up to a pixel (MNIST's own centres of mass are up to ~0.5 px off centre)."""
    return max(float(np.corrcoef(np.roll(x[..., 0], (dy, dx), (0, 1)).ravel(), digit.ravel())[0, 1])
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def _on_paper(digit: np.ndarray, size=(200, 120), at=(20, 10), scale=84) -> Image.Image:
    """The digit black on white, upscaled and off centre, as a scan or a drawing would be."""
    big = Image.fromarray(255 - digit).resize((scale, scale), Image.Resampling.BICUBIC)
    paper = Image.new("L", size, 255)
    paper.paste(big, at)
    return paper


# ---- conversion -------------------------------------------------------------------------


@pytest.mark.parametrize("invert", [False, True])
def test_a_28x28_mnist_png_is_used_as_is(mnist, tmp_path, invert):
    for i in range(10):
        digit = mnist.x_test[i]
        Image.fromarray(255 - digit if invert else digit).save(tmp_path / "d.png")
        x = preprocess(tmp_path / "d.png")
        assert x.shape == (28, 28, 1) and x.dtype == np.float32
        np.testing.assert_array_equal(x, data.to_float(digit))  # the test set's own pixels


def test_a_large_dark_on_light_rgb_digit_is_refitted_and_centred(mnist, tmp_path):
    for i in range(20):
        digit = mnist.x_test[i]
        _on_paper(digit).convert("RGB").save(tmp_path / "d.png")
        x = preprocess(tmp_path / "d.png")
        assert x.shape == (28, 28, 1) and 0 <= x.min() and x.max() <= 1
        cy, cx = _centre_of_mass(x)
        assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1, (i, cy, cx)
        assert abs(max(_box(x)) - 20) <= 1, (i, _box(x))
        assert _like(x, digit) > 0.9, i


def test_a_grey_noisy_photo_like_jpeg(mnist, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(20):
        digit = mnist.x_test[i]
        paper = np.asarray(_on_paper(digit), dtype=np.float32) * 0.6 + 60  # grey paper and ink
        noisy = np.clip(paper + rng.normal(0, 6, paper.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).convert("RGB").save(tmp_path / "d.jpg", quality=85)
        x = preprocess(tmp_path / "d.jpg")
        assert x[0].max() == 0 and x[:, 0].max() == 0  # the paper is black, its noise gone
        assert abs(max(_box(x)) - 20) <= 1, i  # no speck of noise stretched the box
        assert _like(x, digit) > 0.85, i


@pytest.mark.parametrize("ink", ["black", "white"])
def test_transparent_background_is_background(mnist, tmp_path, ink):
    """Strokes on a transparent layer whose hidden colour is black, as drawing apps save them."""
    digit = mnist.x_test[1]
    alpha = np.asarray(Image.fromarray(digit).resize((90, 90), Image.Resampling.BICUBIC))
    rgba = np.zeros((90, 90, 4), dtype=np.uint8)
    rgba[..., :3] = 0 if ink == "black" else 255
    rgba[..., 3] = alpha
    Image.fromarray(rgba, "RGBA").save(tmp_path / "d.png")
    x = preprocess(tmp_path / "d.png")
    assert abs(max(_box(x)) - 20) <= 1
    assert _like(x, digit) > 0.9


def test_a_16_bit_png_is_scaled_not_clipped(mnist, tmp_path):
    digit = mnist.x_test[2]
    Image.fromarray(digit.astype(np.uint16) * 257).save(tmp_path / "d.png")
    np.testing.assert_allclose(preprocess(tmp_path / "d.png"), data.to_float(digit), atol=1e-6)


def test_fashion_items_fill_the_canvas(tmp_path):
    shoe = np.zeros((60, 150), dtype=np.uint8)
    shoe[10:50, 5:145] = 200
    Image.fromarray(255 - shoe).save(tmp_path / "shoe.png")  # dark on white, as a product photo
    x = preprocess(tmp_path / "shoe.png", "fashion-mnist")
    assert max(_box(x)) == 28
    assert max(_box(preprocess(tmp_path / "shoe.png"))) == 20  # the MNIST way


def _blank(p: Path) -> None:
    Image.new("RGB", (64, 48), (250, 250, 250)).save(p)


def _text(p: Path) -> None:
    p.write_text("not an image\n")


def _truncated(p: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:200])


@pytest.mark.parametrize("make, message", [
    (_blank, "no digit/ink found"), (_text, "not a readable image"),
    (_truncated, "not a readable image"), (None, "no such file")])
def test_bad_files_raise_a_predict_error_naming_them(tmp_path, make, message):
    path = tmp_path / "digit.png"
    if make:
        make(path)
    with pytest.raises(PredictError, match=message) as err:
        preprocess(path)
    assert str(path) in str(err.value)


# ---- with a real logged model -----------------------------------------------------------


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, mnist):
    """A 1-epoch MLP on 2,000 images, registered as `mlp_tpe` in a fresh MLflow store.

    Logged directly rather than by `retrain`: seconds, and independent of the search.
    """
    from mnist_opt.quiet import import_tensorflow

    import_tensorflow()
    import keras
    import mlflow

    from mnist_opt.tracking import runs as tracking
    from mnist_opt.training.models import build_model
    from mnist_opt.training.loop import train

    tmp = tmp_path_factory.mktemp("predict")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        (tmp / "mlruns").mkdir()
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}")
        mp.setenv("MNIST_OPT_STUDIES", str(ROOT / "studies"))
        params = {"n_layers": 1, "units_l0": 64, "dropout_l0": 0.0, "batch_norm": False,
                  "activation": "relu", "optimizer": "adam", "learning_rate": 3e-3,
                  "batch_size": 64}
        x, y = data.stratified_subset(mnist.x_train, mnist.y_train, 2000, 0)
        keras.utils.set_random_seed(0)
        model = build_model(params)
        train(model, params, (data.to_float(x), y.astype("int64")), None, epochs=1)
        with mlflow.start_run(experiment_id=tracking.open_experiment("mlp_tpe")):
            tracking.log_model(model, registered_name="mlp_tpe")
        probs = np.asarray(model(data.to_float(mnist.x_test[:100]), training=False))
        # digits the model gets right with confidence: a converted copy should agree with them
        sure = [i for i in range(100)
                if probs[i].max() >= 0.9 and probs[i].argmax() == mnist.y_test[i]]
        yield {"model": model, "probs": probs, "sure": sure[:2], "tmp": tmp}


def _main(*args: str) -> int:
    """The CLI in this process; its Ctrl-C handler is undone afterwards."""
    from mnist_opt.cli import main

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return main(list(args))
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


LINE = re.compile(r"^(?P<path>.+): (?P<name>.+) \(p=(?P<p>[0-9.]+)\)   top-3: (?P<top>.+)$")


@pytest.mark.e2e
@pytest.mark.slow  # `registered` trains and logs a model
def test_cli_prints_the_class_and_top_3_per_image(registered, mnist, capsys):
    a, b = registered["sure"]
    folder = registered["tmp"] / "images"
    folder.mkdir(exist_ok=True)
    digits = {"a": mnist.x_test[a], "b": mnist.x_test[b]}
    Image.fromarray(digits["a"]).save(folder / "a.png")
    big = Image.fromarray(digits["a"]).resize((100, 100), Image.Resampling.BICUBIC)
    big.save(folder / "a_big.png")  # white on black, only larger
    _on_paper(digits["a"]).convert("RGB").save(folder / "a_paper.png")
    Image.fromarray(digits["b"]).save(folder / "b.png")
    _on_paper(digits["b"], size=(90, 160), at=(0, 50), scale=80).save(folder / "b_paper.png")
    paths = [str(folder / n) for n in ("a.png", "a_big.png", "a_paper.png", "b.png", "b_paper.png")]

    assert _main("predict", "--model", "models:/mlp_tpe/latest", *paths) == 0
    out = capsys.readouterr()
    lines = [LINE.match(line) for line in out.out.splitlines()]
    assert all(lines) and [m["path"] for m in lines] == paths, out.out
    top = {}
    for m in lines:
        pairs = [item.rsplit(" ", 1) for item in m["top"].split(", ")]
        probs = [float(p) for _, p in pairs]
        assert len(pairs) == 3 and all(n in data.CLASS_NAMES["mnist"] for n, _ in pairs)
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0005
        assert pairs[0][0] == m["name"] and float(m["p"]) == probs[0]
        top[Path(m["path"]).stem] = m["name"]
    direct = registered["probs"].argmax(axis=1)
    assert top["a"] == str(direct[a]) and top["b"] == str(direct[b])  # the model, unchanged
    assert top["a_big"] == top["a_paper"] == top["a"] and top["b_paper"] == top["b"]


@pytest.mark.e2e
@pytest.mark.slow  # `registered` trains and logs a model
def test_predict_returns_the_models_probabilities(registered, mnist):
    from mnist_opt.training.predict import predict

    a = registered["sure"][0]
    path = registered["tmp"] / "direct.png"
    Image.fromarray(mnist.x_test[a]).save(path)
    (result,) = predict("models:/mlp_tpe/1", [path])
    expected = registered["probs"][a]
    assert result.class_index == expected.argmax() and result.class_name == str(expected.argmax())
    assert result.probability == pytest.approx(expected.max(), abs=1e-5)
    assert [p for _, p in result.top] == pytest.approx(np.sort(expected)[::-1][:3], abs=1e-5)
    (fashion,) = predict("models:/mlp_tpe/1", [path], dataset="fashion-mnist")
    assert fashion.class_name == data.CLASS_NAMES["fashion-mnist"][result.class_index]


@pytest.mark.e2e
@pytest.mark.slow  # `registered` trains and logs a model
def test_the_dataset_comes_from_the_study_run_when_no_study_file_names_it(registered, mnist,
                                                                          capsys):
    import mlflow

    from mnist_opt.tracking import runs as tracking
    from mnist_opt.training.predict import predict

    path = registered["tmp"] / "direct.png"
    Image.fromarray(mnist.x_test[0]).save(path)
    exp = tracking.open_experiment("not_a_study_file")
    with mlflow.start_run(experiment_id=exp) as run:
        tracking.log_model(registered["model"])
    uri = f"runs:/{run.info.run_id}/model"
    (result,) = predict(uri, [path])
    assert result.class_name in data.CLASS_NAMES["mnist"]
    assert "assuming mnist" in capsys.readouterr().err
    with mlflow.start_run(experiment_id=exp, tags={"mnist_opt.kind": "study"}):
        mlflow.log_param("dataset", "fashion-mnist")  # as `mnist-opt study` logs its config
    (result,) = predict(uri, [path])
    assert result.class_name in data.CLASS_NAMES["fashion-mnist"]
    assert "assuming" not in capsys.readouterr().err


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mnist-opt: error: "), err
    return lines[0]


@pytest.mark.e2e
@pytest.mark.slow  # `registered` trains and logs a model
def test_an_unknown_model_exits_2_with_one_error(registered, mnist, capsys):
    path = registered["tmp"] / "digit.png"
    Image.fromarray(mnist.x_test[0]).save(path)
    assert _main("predict", "--model", "models:/no_such_model/latest", str(path)) == 2
    out = capsys.readouterr()
    line = _one_error(out.err)
    assert "models:/no_such_model/latest" in line and "make retrain" in line and not out.out


@pytest.mark.e2e
@pytest.mark.slow  # `registered` trains and logs a model
def test_a_bad_image_exits_2_naming_the_file(registered, mnist, capsys):
    good, bad = registered["tmp"] / "digit.png", registered["tmp"] / "notes.png"
    Image.fromarray(mnist.x_test[0]).save(good)
    bad.write_text("shopping list\n")
    assert _main("predict", "--model", "models:/mlp_tpe/latest", str(good), str(bad)) == 2
    out = capsys.readouterr()
    assert str(bad) in _one_error(out.err) and not out.out


@pytest.mark.e2e
@pytest.mark.slow  # `registered` trains and logs a model
def test_no_tracking_store_here_is_an_error_that_creates_none(registered, monkeypatch, tmp_path):
    from mnist_opt.training.predict import predict

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PredictError, match="no MLflow tracking store"):
        predict("models:/mlp_tpe/latest", [tmp_path / "digit.png"])
    assert not (tmp_path / "mlruns").exists()
