"""Copy the studies' tables, CSVs, JSON summaries and plots (not the run folders) next to docs/results.md.

    python bench/publish.py                                   # bench/results/quick -> docs/results/quick
    python bench/publish.py --src bench/results/full --dst docs/results/full

Only ``*.md``, ``*.csv``, ``*.json`` and ``*.png`` directly in each study folder (and its ``per_volume/``
and ``iou/``) are copied. Run folders (checkpoints, site states, each site's ``samples.png``, which shows the site's
images: the data sets' licences do not allow republishing them) stay in the results folder.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

STUDIES = ("accuracy", "data_efficiency", "convergence", "privacy", "cost", "tune", "crosscheck")
SUFFIXES = {".md", ".csv", ".json", ".png"}


def publish(src: Path, dst: Path) -> list[Path]:
    copied = []
    for study in STUDIES:
        folder = src / study
        if not folder.is_dir():
            continue
        for path in sorted([*folder.glob("*"), *folder.glob("per_volume/*"), *folder.glob("iou/*")]):
            rel = path.relative_to(folder)
            if path.is_file() and path.suffix in SUFFIXES and path.name != "samples.png":
                target = dst / study / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
                copied.append(target)
    return copied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path("bench/results/quick"))
    ap.add_argument("--dst", type=Path, default=Path("docs/results/quick"))
    args = ap.parse_args()
    for path in publish(args.src, args.dst):
        print(path)


if __name__ == "__main__":
    main()
