"""Which images belong to one patient: the unit of splits and of differential privacy.

A site's records are grouped by patient (``SiteData.groups``). Splits never separate a patient's images and
the private trainer samples, clips and accounts whole patients. Where the grouping comes from:

* **3D volumes** (NIfTI, npz volumes): every slice of a volume belongs to that volume's patient.
* **2D image folders**: a ``patients.csv`` beside ``images/`` and ``masks/`` with a header ``file,patient``
  and one row per image (``file`` is the image's file name, with or without extension)::

      file,patient
      case001_a.png,P001
      case001_b.png,P001
      case002.png,P002

  Every image must be listed (a missing or unknown file is an error that names it). Several volumes of
  one patient can be grouped the same way.
* **A file-name pattern** (``SiteSpec.patient_pattern``, any source): a regular expression whose first
  group is the patient id, matched against each record's id (a file stem / npz id), e.g.
  ``'^(.+?)(?:_\\d+)?$'`` puts ``SSM11`` and ``SSM11_2`` together.
* Otherwise every 2D image is its own patient; ``genseg-fed check-site`` warns that it cannot tell
  patients apart.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from genseg_fed.data.site import DataError

__all__ = ["PATIENTS_FILE", "apply_pattern", "read_patients_csv", "regroup"]

PATIENTS_FILE = "patients.csv"
_MAX_LISTED = 10


def _stem(name: str) -> str:
    name = name.strip()
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return name[: -len(".nii.gz")]
    return Path(name).stem if Path(name).suffix else name


def read_patients_csv(path: Path, stems: Sequence[str], *, site: str) -> dict[str, str]:
    """``{file stem: patient}`` from ``path`` for every stem in ``stems``; DataError names any problem."""
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
            header = [h.strip() for h in (rows[0].keys() if rows else [])]
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"site '{site}': cannot read {path}: {exc}") from exc
    if not rows or set(header) != {"file", "patient"}:
        raise DataError(
            f"site '{site}': {path} must have the header 'file,patient' and one row per image "
            f"(got header {header or 'none'})"
        )
    table: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        file, patient = (row.get("file") or "").strip(), (row.get("patient") or "").strip()
        if not file or not patient:
            raise DataError(f"site '{site}': {path} line {line}: both 'file' and 'patient' are required")
        stem = _stem(file)
        if table.get(stem, patient) != patient:
            raise DataError(f"site '{site}': {path} line {line}: '{file}' is listed for two patients")
        table[stem] = patient
    missing = sorted(set(stems) - table.keys())
    unknown = sorted(table.keys() - set(stems))
    problems = []
    if missing:
        problems.append(f"{len(missing)} image(s) not listed: {', '.join(missing[:_MAX_LISTED])}")
    if unknown:
        problems.append(f"{len(unknown)} listed file(s) not in images/: {', '.join(unknown[:_MAX_LISTED])}")
    if problems:
        raise DataError(f"site '{site}': {path}: " + "; ".join(problems) + " (every image needs one row)")
    return table


def apply_pattern(ids: Sequence[str], pattern: str, *, site: str) -> tuple[str, ...]:
    """The patient of each id: the first group of ``pattern`` matched against it."""
    regex = re.compile(pattern)
    out = []
    for record_id in ids:
        match = regex.search(record_id)
        if match is None or not match.groups() or not match.group(1):
            raise DataError(
                f"site '{site}': patient_pattern {pattern!r} does not match record id '{record_id}' "
                "(its first group must capture the patient id)"
            )
        out.append(match.group(1))
    return tuple(out)


def regroup(groups: Sequence[str], table: Mapping[str, str]) -> tuple[str, ...]:
    """Map each current group (a file stem) to its patient."""
    return tuple(table[g] for g in groups)
