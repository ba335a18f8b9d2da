"""The genseg-fed command: train-local end to end on a tiny folder site, resume, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from genseg_fed.cli import main
from genseg_fed.data import SiteData, write_site_folder

TINY = [
    "data.image_size=32",
    "data.n_train=4",
    "data.n_val=2",
    "data.test_fraction=0.3",
    "model.seg_features=[8, 16, 32]",
    "model.gen_features=8",
    "model.gen_depth=2",
    "model.disc_features=8",
    "model.disc_layers=2",
    "mlo.batch_size=2",
    "mlo.pretrain_iterations=2",
    "mlo.pool_size=2",
    "mlo.iterations=4",
    "mlo.checkpoint_every=2",
]


@pytest.fixture
def site_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    n, size = 10, 40
    masks = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        r, c = rng.integers(5, 20, size=2)
        masks[i, 0, r : r + 12, c : c + 10] = 1
    images = np.clip(masks * 1.2 - 0.6 + 0.1 * rng.standard_normal(masks.shape), -1, 1).astype(np.float32)
    ids = tuple(f"case{i:02d}" for i in range(n))
    write_site_folder(SiteData("clinic", images, masks, ids, ids), tmp_path / "clinic")
    return tmp_path / "clinic"


def _args(*extra: str) -> list[str]:
    return [a for kv in TINY for a in ("--set", kv)] + list(extra)


@pytest.mark.parametrize("mode", ["seg-only", "aug", "genseg"])
def test_train_local_writes_a_complete_run_folder(
    site_folder: Path, tmp_path: Path, mode: str, capsys
) -> None:
    out = tmp_path / f"run-{mode}"
    rc = main(
        [
            "train-local",
            "--site",
            str(site_folder),
            "--out",
            str(out),
            "--no-progress",
            *_args("--set", f"mlo.mode={mode}"),
        ]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # fair data access: without level III the 2 validation images are trained on too
    trained = 4 if mode == "genseg" else 6
    assert metrics["iterations"] == 4 and metrics["counts"]["train"] == trained
    assert 0.0 <= metrics["test"]["dice"] <= 1.0 and np.isfinite(metrics["test"]["hd95"])
    for name in ("config.yaml", "checkpoint.pt", "segmenter.pt", "samples.png"):
        assert (out / name).is_file(), name
    assert (out / "generator.pt").is_file() == (mode != "seg-only")
    assert "test Dice" in capsys.readouterr().out


def test_train_local_resumes_from_its_checkpoint(site_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert (
        main(["train-local", "--site", str(site_folder), "--out", str(out), "--no-progress", *_args()]) == 0
    )
    rc = main(
        [
            "train-local",
            "--site",
            str(site_folder),
            "--out",
            str(out),
            "--no-progress",
            "--resume",
            *_args("--set", "mlo.iterations=6"),
        ]
    )
    assert rc == 0
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train-local", "--site", "no/such/site"], "does not exist"),
        (["train-local", "--site", "hospital-a", "--set", "mlo.mode=magic"], "choose one of"),
        (["train-local", "--site", "hospital-a", "--set", "mlo.innr_lr=1"], "unknown key"),
        (["show-config", "--config", "no-such.yaml"], "config file not found"),
        (["check-site", "no/such/site"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_check_site_summarises_a_good_folder(site_folder: Path, capsys) -> None:
    assert main(["check-site", str(site_folder), "--image-size", "32"]) == 0
    assert "10 images" in capsys.readouterr().out


def test_train_pooled_tests_every_site(site_folder: Path, tmp_path: Path, capsys) -> None:
    import yaml

    cfg = {
        "data": {
            "sites": [{"name": "one", "source": "folder", "path": str(site_folder)}],
            "heldout": [{"name": "two", "source": "folder", "path": str(site_folder)}],
        }
    }
    path = tmp_path / "pooled.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "pooled"
    assert main(["train-pooled", "--config", str(path), "--out", str(out), "--no-progress", *_args()]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) == {"one", "two"} and metrics["heldout"] == ["two"]
    assert "two (held-out)" in capsys.readouterr().out


def test_train_local_with_differential_privacy_reports_epsilon(site_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "dp"
    extra = ("--set", "privacy.enabled=true", "--set", "privacy.epsilon=8", "--set", "mlo.mode=seg-only")
    assert (
        main(["train-local", "--site", str(site_folder), "--out", str(out), "--no-progress", *_args(*extra)])
        == 0
    )
    dp = json.loads((out / "metrics.json").read_text())["privacy"]
    assert 0 < dp["epsilon"] <= 8.0 + 1e-6 and dp["epsilon-target"] == 8.0
    assert dp["noise-seg"] > 0 and dp["clip-seg"] == 1.0
