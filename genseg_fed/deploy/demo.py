"""Hospital folders for trying a deployment: ``python -m genseg_fed.deploy.demo OUT``.

Writes one folder per site in the layout a hospital provides (``images/*.png`` + ``masks/*.png``,
paired by name), taken from the embedded default data: slices of the real MNI152 T1 brain template
(nilearn) with its white-matter mask, each site in its own orientation and with its own
**simulated** acquisition profile (as ``configs/default.yaml``). They are for checking that a
federation works end to end (``deploy/README.md``, ``bench/round_overhead.py``); the site shift is
simulated, so do not judge cross-site generalisation on them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..config import SiteSpec
from ..data import load_site, write_site_folder

__all__ = ["write_demo_sites"]

# (orientation, profile) per site, in order; the same hospitals as configs/default.yaml
_SITES = (
    ("axial", "scanner-a"),
    ("coronal", "scanner-b"),
    ("sagittal", "scanner-c"),
    ("axial", "scanner-d"),
)


def write_demo_sites(root: Path, names: Sequence[str], *, n: int = 12, size: int = 64) -> dict[str, Path]:
    """``root/<name>/images`` + ``masks`` for each name (``n`` slices of ``size`` px); returns name -> folder.

    Existing site folders are kept as they are.
    """
    folders = {}
    for i, name in enumerate(names):
        folder = Path(root) / name
        if not (folder / "images").is_dir():
            orientation, profile = _SITES[i % len(_SITES)]
            spec = SiteSpec(name=name, source="mni152", orientation=orientation, profile=profile)
            data = load_site(spec, image_size=size, channels=1)
            keep = np.linspace(0, len(data) - 1, num=min(n, len(data))).round().astype(int)
            write_site_folder(data.subset(keep), folder)
        folders[name] = folder
    return folders


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m genseg_fed.deploy.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder to write the site folders into")
    p.add_argument(
        "--site", action="append", default=[], help="site name (repeatable; default hospital-a, -b)"
    )
    p.add_argument("--images", type=int, default=12, help="images per site (default 12, at most 41)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    args = p.parse_args(argv)
    for name, folder in write_demo_sites(
        args.out, args.site or ["hospital-a", "hospital-b"], n=args.images, size=args.size
    ).items():
        print(f"{name}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
