"""Training data for the recipes: MNIST through keras.datasets, or scikit-learn's bundled digits.

``digits`` works offline: scikit-learn ships its 1,797 8x8 handwritten digits. They are
scaled to MNIST's layout (a 20x20 digit centred in a 28x28 frame, white ink on black,
values in [0, 1]) and split into training and held-out sets with a fixed seed, so every
run (and the sample images) uses the same held-out digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DIGIT_CLASSES = [str(d) for d in range(10)]
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0


class DatasetUnavailableError(RuntimeError):
    """The data set cannot be loaded here (not downloadable and no local copy)."""


@dataclass
class Split:
    """Images as float32 NHWC in [0, 1] and integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    source: str


def _to_mnist_frame(images_8x8: np.ndarray) -> np.ndarray:
    from PIL import Image

    out = np.zeros((len(images_8x8), 28, 28, 1), dtype=np.float32)
    for i, image in enumerate(images_8x8):
        scaled = Image.fromarray((image / 16.0).astype(np.float32), mode="F")
        digit = np.asarray(scaled.resize((20, 20), Image.Resampling.BILINEAR))
        out[i, 4:24, 4:24, 0] = np.clip(digit, 0.0, 1.0)
    return out


def load_digits() -> Split:
    """scikit-learn's digits as 28x28x1 images with a fixed 80/20 train/held-out split."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = _to_mnist_frame(bunch.images)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_test = round(len(labels) * HELDOUT_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return Split(
        images[train], labels[train], images[test], labels[test], DIGIT_CLASSES,
        "scikit-learn digits (8x8 upscaled to 28x28)",
    )


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]

#: name -> (keras.datasets module, class names, scale to [0, 1]?)
KERAS_DATASETS = {
    "mnist": ("mnist", DIGIT_CLASSES, True),
    "fashion_mnist": ("fashion_mnist", FASHION_CLASSES, True),
    # CIFAR-10 stays in 0-255: the recipe standardises per channel, as the seed does.
    "cifar10": ("cifar10", CIFAR10_CLASSES, False),
}
DATASETS = ("digits", *KERAS_DATASETS)


def load_keras_dataset(name: str, data_dir: Path | None = None) -> Split:
    """A keras.datasets set, or ``data_dir/<name>.npz`` holding x_train, y_train, x_test,
    y_test (the layout of Keras' own mnist.npz; no pickles are read)."""
    module, classes, to_unit = KERAS_DATASETS[name]
    if data_dir is not None:
        path = Path(data_dir) / f"{name}.npz"
        if not path.is_file():
            raise DatasetUnavailableError(
                f"--data-dir {data_dir} has no {name}.npz (arrays x_train, y_train, x_test, "
                "y_test, as in Keras' mnist.npz)"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                x_train, y_train = data["x_train"], data["y_train"]
                x_test, y_test = data["x_test"], data["y_test"]
        except (KeyError, ValueError, OSError) as exc:
            raise DatasetUnavailableError(f"{path} is not a usable {name} file: {exc}") from None
        source = str(path)
    else:
        import importlib

        loader = importlib.import_module(f"keras.datasets.{module}")
        try:
            (x_train, y_train), (x_test, y_test) = loader.load_data()
        except Exception as exc:
            raise DatasetUnavailableError(
                f"cannot download {name} ({type(exc).__name__}: {exc}); put {name}.npz in a "
                "folder and pass --data-dir FOLDER"
                + (", or use --dataset digits (bundled, offline)" if to_unit else "")
            ) from None
        source = f"keras.datasets.{module}"

    def prepare(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        if x.ndim == 3:
            x = x[..., np.newaxis]
        return x / 255.0 if to_unit else x

    return Split(prepare(x_train), y_train.reshape(-1).astype(np.int64), prepare(x_test),
                 y_test.reshape(-1).astype(np.int64), classes, source)


def load(name: str, data_dir: Path | None = None) -> Split:
    """Load a data set by name: digits (bundled), mnist, fashion_mnist or cifar10."""
    if name == "digits":
        return load_digits()
    if name in KERAS_DATASETS:
        return load_keras_dataset(name, data_dir)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
