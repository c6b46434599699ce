"""Write some Fashion-MNIST classes as an image folder of PNGs: OUT/train/<class>/*.png and OUT/test/<class>/*.png.

The README uses it to hand ``sdlora learn`` a folder of classes a demo run has not seen, and ``sdlora predict``
some images to classify. The first N images of each class in the official train and test files are written.

    python scripts/fashion_mnist_folder.py runs/new-classes "Ankle boot" Trouser --train 300 --test 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sdlora.data.readers import FASHION_MNIST_CLASSES, FASHION_MNIST_SYSTEM_DIR, read_idx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("classes", nargs="+", help=f"class names: {', '.join(FASHION_MNIST_CLASSES)}")
    p.add_argument("--train", type=int, default=300, help="images per class from the training file (0: none)")
    p.add_argument("--test", type=int, default=100, help="images per class from the test file")
    p.add_argument("--root", type=Path, default=Path(FASHION_MNIST_SYSTEM_DIR), help="folder of the IDX files")
    args = p.parse_args(argv)
    for name in args.classes:
        if name not in FASHION_MNIST_CLASSES:
            p.error(f"unknown class {name!r}; Fashion-MNIST has {', '.join(FASHION_MNIST_CLASSES)}")
        if "/" in name:
            p.error(f"{name!r} cannot be a folder name")
    for split, prefix, n in (("train", "train", args.train), ("test", "t10k", args.test)):
        if n <= 0:
            continue
        images = read_idx(args.root / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(args.root / f"{prefix}-labels-idx1-ubyte.gz")
        for name in args.classes:
            folder = args.out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            idx = np.flatnonzero(labels == FASHION_MNIST_CLASSES.index(name))[:n]
            for i in idx:
                Image.fromarray(images[i]).save(folder / f"{prefix}_{i:05d}.png")
            print(f"{folder}: {len(idx)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
