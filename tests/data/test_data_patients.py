"""Patients of 2-D sites: patients.csv, a file-name pattern, splits that never straddle a patient, check-site."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from genseg_fed.cli import main
from genseg_fed.config import ConfigError, SiteSpec
from genseg_fed.data import DataError, SiteData, load_site, split_site, write_site_folder
from genseg_fed.data.patients import PATIENTS_FILE

# 12 patients with 1-4 images each (several dermoscopy shots, or slices exported as PNG)
SHOTS = [1, 2, 4, 1, 3, 2, 1, 1, 3, 2, 4, 1]


def _images(n: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    masks = np.zeros((n, 1, size, size), np.float32)
    masks[:, :, 4:10, 3:9] = 1.0
    images = np.clip(masks - 0.5 + 0.1 * rng.standard_normal(masks.shape), -1, 1).astype(np.float32)
    return images, masks


@pytest.fixture
def patient_folder(tmp_path: Path) -> Path:
    ids, groups = [], []
    for p, shots in enumerate(SHOTS):
        for _ in range(shots):
            ids.append(f"img{len(ids):03d}")  # file names say nothing about the patient
            groups.append(f"P{p:02d}")
    images, masks = _images(len(ids))
    write_site_folder(SiteData("clinic", images, masks, tuple(ids), tuple(groups)), tmp_path / "clinic")
    return tmp_path / "clinic"


def _spec(path: Path, **kw: object) -> SiteSpec:
    return SiteSpec(name="clinic", source="folder", path=str(path), **kw)


def test_patients_csv_groups_a_patients_images(patient_folder: Path) -> None:
    assert (patient_folder / PATIENTS_FILE).is_file()
    data = load_site(_spec(patient_folder), image_size=16, channels=1)
    assert len(data) == sum(SHOTS) and len(set(data.groups)) == len(SHOTS)
    assert sorted(data.groups.count(g) for g in set(data.groups)) == sorted(SHOTS)
    assert f"{len(SHOTS)} patients from {PATIENTS_FILE}" in data.description


@pytest.mark.parametrize("n_train", [1, 3, None])
@pytest.mark.parametrize("seed", range(8))
def test_a_patients_images_never_straddle_splits(
    patient_folder: Path, n_train: int | None, seed: int
) -> None:
    data = load_site(_spec(patient_folder), image_size=16, channels=1)
    split = split_site(data, n_train=n_train, n_val=2, test_fraction=0.3, seed=seed)
    where = {}
    for part in ("train", "val", "test"):
        for g in getattr(split, part).groups:
            assert where.setdefault(g, part) == part, f"patient {g} is in {where[g]} and {part}"
    for g, part in where.items():  # and every image of a patient in a split came along
        assert getattr(split, part).groups.count(g) == data.groups.count(g)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("file,patient\nimg000.png,P00\n", "not listed"),
        ("name,who\nimg000.png,P00\n", "header 'file,patient'"),
        ("file,patient\nimg000.png,P00\nimg000.png,P01\n", "two patients"),
    ],
)
def test_a_bad_patients_csv_is_a_clear_error(patient_folder: Path, content: str, message: str) -> None:
    (patient_folder / PATIENTS_FILE).write_text(content)
    with pytest.raises(DataError, match=message):
        load_site(_spec(patient_folder), image_size=16, channels=1)


def test_a_listed_file_that_does_not_exist_is_named(patient_folder: Path) -> None:
    with (patient_folder / PATIENTS_FILE).open("a") as fh:
        fh.write("ghost.png,P99\n")
    with pytest.raises(DataError, match="ghost"):
        load_site(_spec(patient_folder), image_size=16, channels=1)


def test_a_file_name_pattern_groups_repeat_shots(tmp_path: Path) -> None:
    ids = ("SSM11", "SSM11_2", "SSM12", "LMM8", "LMM8_2", "NM1")
    images, masks = _images(len(ids))
    write_site_folder(SiteData("derm", images, masks, ids, ids), tmp_path / "derm")
    data = load_site(_spec(tmp_path / "derm", patient_pattern=r"^(.+?)(?:_\d+)?$"), image_size=16, channels=1)
    assert data.groups == ("LMM8", "LMM8", "NM1", "SSM11", "SSM11", "SSM12")
    with pytest.raises(ConfigError, match="group"):
        _spec(tmp_path, patient_pattern="SSM")
    with pytest.raises(DataError, match="does not match"):
        load_site(_spec(tmp_path / "derm", patient_pattern=r"^(SSM\d+)"), image_size=16, channels=1)


def test_check_site_counts_patients_and_images_and_warns_when_it_cannot_tell(
    patient_folder: Path, tmp_path: Path, capsys
) -> None:
    assert main(["check-site", str(patient_folder), "--image-size", "16"]) == 0
    out = capsys.readouterr()
    assert f"{len(SHOTS)} patients, {sum(SHOTS)} images" in out.out and "cannot tell" not in out.err
    (patient_folder / PATIENTS_FILE).unlink()
    assert main(["check-site", str(patient_folder), "--image-size", "16"]) == 0
    out = capsys.readouterr()
    assert f"{sum(SHOTS)} patients, {sum(SHOTS)} images" in out.out
    assert "cannot tell patients apart" in out.err and "patients.csv" in out.err
