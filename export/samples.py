"""Sample images for the demo: held-out digits and scikit-learn's two bundled photos."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .datasets import load_digits


def write_samples(out_dir: Path, digits_per_class: int = 1) -> list[Path]:
    """Write held-out digits as ``digit_<label>_<n>.png`` (28x28 grayscale) and the photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out_dir.mkdir(parents=True, exist_ok=True)
    split = load_digits()
    written: list[Path] = []
    for label in range(10):
        picks = np.flatnonzero(split.y_test == label)[:digits_per_class]
        for n, index in enumerate(picks):
            pixels = np.round(split.x_test[index, :, :, 0] * 255).astype(np.uint8)
            path = out_dir / f"digit_{label}_{n}.png"
            Image.fromarray(pixels, mode="L").save(path)
            written.append(path)
    for source in load_sample_images().filenames:
        target = out_dir / Path(source).name
        shutil.copyfile(source, target)
        written.append(target)
    return written
