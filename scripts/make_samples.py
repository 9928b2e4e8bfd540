"""Regenerate the sample data shipped in data/samples/.

- Natural images bundled with scikit-image (no download; see skimage/data/README.txt for
  their public-domain / CC0 sources), resized so the longer side is 320 px.
- Synthetic images with exact ground truth (unsup.synthetic): images in data/samples/ too (so
  the demo shows them), images + label maps under data/synthetic/{images,masks}/ (usable as
  the dataset spec ``masks:data/synthetic/images:data/synthetic/masks``).

Usage: python scripts/make_samples.py [--out data/samples] [--synthetic-out data/synthetic]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from unsup.io import write_image, write_label_map
from unsup.synthetic import make_shapes_image

NATURAL = ("astronaut", "coffee", "chelsea", "rocket")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/samples")
    parser.add_argument("--synthetic-out", default="data/synthetic")
    parser.add_argument("--max-side", type=int, default=320)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in NATURAL:
        image = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        scale = args.max_side / max(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)),
                                 Image.Resampling.LANCZOS)
        image.save(out / f"{name}.jpg", quality=92)
    for i in range(3):
        image, labels = make_shapes_image((120, 160), n_shapes=3 + i, noise=6.0,
                                          texture=10.0 * i, seed=100 + i)
        write_image(Path(args.synthetic_out) / "images" / f"shapes_{i}.png", image)
        write_label_map(Path(args.synthetic_out) / "masks" / f"shapes_{i}.png", labels)
        if i < 2:
            write_image(out / f"shapes_{i}.png", image)
    print(f"wrote samples to {out}")


if __name__ == "__main__":
    np.random.seed(0)
    main()
