"""The benchmark harness: statistics, the data-efficiency factor, result extraction and resumable runs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from conftest import write_tiny_experiment

from bench import common
from bench.common import (
    Dataset,
    Estimate,
    RunKey,
    Size,
    StaleResultError,
    crossing_n,
    efficiency_factor,
    fed_methods,
    method_rows,
    paired_difference,
    per_seed_scores,
    run_job,
    run_lock,
)

# ----------------------------------------------------------------------------------------- statistics


def test_estimate_mean_std_and_t_interval() -> None:
    est = Estimate.of([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * sample std / sqrt(n)
    assert (est.mean, est.std, est.n) == (2.0, 1.0, 3)
    assert est.lo == pytest.approx(2.0 - half) and est.hi == pytest.approx(2.0 + half)


@pytest.mark.parametrize(
    ("values", "n", "finite_ci"),
    [([], 0, False), ([0.5], 1, False), ([0.5, None, float("nan"), 0.7], 2, True)],
)
def test_estimate_ignores_missing_values_and_needs_two_for_a_ci(values, n, finite_ci) -> None:
    est = Estimate.of(values)
    assert est.n == n
    assert math.isfinite(est.lo) is finite_ci


def test_paired_difference_uses_only_seeds_both_methods_have() -> None:
    a = {0: 0.70, 1: 0.60, 2: 0.80, 3: 0.99}
    b = {0: 0.60, 1: 0.55, 2: 0.65}
    est = paired_difference(a, b)
    assert est.n == 3
    assert est.mean == pytest.approx((0.10 + 0.05 + 0.15) / 3)
    assert est.lo < est.mean < est.hi


@pytest.mark.parametrize(
    ("target", "grid", "interpolated"),
    [
        (0.40, 9.0, 9.0),  # already reached at the first N
        (0.60, 20.0, 20.0),  # exactly on a grid point
        (0.65, 50.0, 35.0),  # halfway between 20 (0.6) and 50 (0.7)
        (0.80, None, None),  # never reached
    ],
)
def test_crossing_n(target, grid, interpolated) -> None:
    got_grid, got_interpolated = crossing_n([9, 20, 50], [0.5, 0.6, 0.7], target)
    assert got_grid == grid
    assert got_interpolated == (None if interpolated is None else pytest.approx(interpolated))


def test_efficiency_factor_on_the_grid_interpolated_per_seed_and_bootstrap() -> None:
    # seg-only: 0.5, 0.6, 0.7 at N = 9, 20, 50 (both seeds); genseg at N = 9: 0.6 and 0.7 (mean 0.65)
    curve = {n: {0: v, 1: v} for n, v in ((9, 0.5), (20, 0.6), (50, 0.7))}
    f = efficiency_factor(curve, {0: 0.6, 1: 0.7}, base_n=9)
    assert f["grid"] == pytest.approx(50 / 9)
    assert f["interpolated"] == pytest.approx(35 / 9)
    assert f["per_seed"] == {0: pytest.approx(20 / 9), 1: pytest.approx(50 / 9)}
    assert f["bootstrap"]["lo"] == pytest.approx(20 / 9) and f["bootstrap"]["hi"] == pytest.approx(50 / 9)
    assert f["bootstrap"]["censored"] == 0


def test_efficiency_factor_when_seg_only_never_catches_up_is_censored() -> None:
    curve = {n: {0: 0.5} for n in (9, 20, 50)}
    f = efficiency_factor(curve, {0: 0.9}, base_n=9)
    assert f["grid"] is None and f["interpolated"] is None
    assert f["lower_bound"] == pytest.approx(50 / 9)
    assert f["bootstrap"]["censored"] == f["bootstrap"]["draws"]


def test_efficiency_factor_is_one_when_genseg_does_not_help() -> None:
    curve = {n: {0: 0.8, 1: 0.8} for n in (9, 20)}
    f = efficiency_factor(curve, {0: 0.7, 1: 0.75}, base_n=9)
    assert f["grid"] == f["interpolated"] == 1.0


# ----------------------------------------------------------------------------------------- extraction


def _history() -> dict:
    return {
        "rounds": [
            {
                "evaluate": {
                    "a": {"global": {"dice": 0.1}},
                    "b": {"global": {"dice": 0.1}},
                    "h": {"global": {"dice": 0.1}},
                }
            },
            {
                "evaluate": {
                    "a": {"global": {"dice": 0.7}},
                    "b": {"global": {"dice": 0.5}},
                    "h": {"global": {"dice": 0.4}},
                }
            },
        ],
        "crosssite": {
            "models": ["global", "local:a", "local:b"],
            "sites": ["a", "b", "h"],
            "heldout": ["h"],
            "dice": [[0.7, 0.5, 0.4], [0.8, 0.2, 0.3], [0.1, 0.6, 0.5]],
        },
    }


def test_fed_methods_take_the_last_round_and_each_sites_own_local_model() -> None:
    methods = fed_methods(common.JOBS["fedavg-seg-only"], _history())
    assert methods["fedavg-seg-only"] == {"a": 0.7, "b": 0.5, "h": 0.4}
    # local: site a's model on a, site b's model on b; held-out: mean of the local models on h
    assert methods["local-seg-only"] == pytest.approx({"a": 0.8, "b": 0.6, "h": 0.4})


def test_per_seed_scores_average_training_sites_and_held_out_separately() -> None:
    results = [
        {
            "dataset": "d",
            "n": 9,
            "seed": seed,
            "sites": {"train": ["a", "b"], "heldout": ["h"]},
            "methods": {"m": {"a": 0.6 + seed / 10, "b": 0.4, "h": 0.3}},
        }
        for seed in (0, 1)
    ]
    scores = per_seed_scores(method_rows(results))
    assert scores[("d", "m", 9)][0] == pytest.approx(
        {"a": 0.6, "b": 0.4, "h": 0.3, "train_mean": 0.5, "heldout": 0.3}
    )
    assert scores[("d", "m", 9)][1]["train_mean"] == pytest.approx(0.55)


# ----------------------------------------------------------------------------------------- resumable runs

TINY = Size("tiny", ("federation.rounds=2", "federation.local_iterations=1"), seeds=(0,), ns=(4,))


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Dataset:
    path = write_tiny_experiment(tmp_path)
    return Dataset("tiny", str(path), "tiny PNG sites", simulated_shift=True)


def test_a_finished_run_is_loaded_not_repeated(tmp_path: Path, tiny_dataset: Dataset, monkeypatch) -> None:
    job = common.JOBS["fedavg-seg-only"]
    first = run_job(tmp_path / "res", tiny_dataset, TINY, job, 4, 0, progress=False)
    assert set(first["methods"]) == {"fedavg-seg-only", "local-seg-only"}
    assert set(first["methods"]["fedavg-seg-only"]) == {"site-a", "site-b", "site-c"}
    assert first["traffic"]["train"]["bytes_up"] > 0
    folder = RunKey("tiny", job.name, 4, 0).folder(tmp_path / "res")
    assert (folder / "result.json").is_file() and not (folder / ".lock").exists()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(common, "run_federated", must_not_run)
    assert run_job(tmp_path / "res", tiny_dataset, TINY, job, 4, 0, progress=False) == first
    other = Size("tiny", ("federation.rounds=3", "federation.local_iterations=1"), seeds=(0,), ns=(4,))
    with pytest.raises(StaleResultError, match="another --out"):
        run_job(tmp_path / "res", tiny_dataset, other, job, 4, 0, progress=False)


def test_a_killed_federated_run_resumes_from_its_checkpoint(
    tmp_path: Path, tiny_dataset: Dataset, monkeypatch
) -> None:
    from server import federation

    job = common.JOBS["fedavg-aug"]
    real_round = federation.Coordinator.run_round

    def killed_in_round_2(self, rnd):
        if rnd == 2:
            raise KeyboardInterrupt("benchmark killed")
        return real_round(self, rnd)

    monkeypatch.setattr(federation.Coordinator, "run_round", killed_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_job(tmp_path / "res", tiny_dataset, TINY, job, 4, 0, progress=False)
    folder = RunKey("tiny", job.name, 4, 0).folder(tmp_path / "res")
    assert (folder / "checkpoint.pt").is_file() and not (folder / "result.json").exists()
    assert not (folder / ".lock").exists()

    monkeypatch.setattr(federation.Coordinator, "run_round", real_round)
    result = run_job(tmp_path / "res", tiny_dataset, TINY, job, 4, 0, progress=False)
    assert result["resumed"] is True
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    history = json.loads((folder / "metrics.json").read_text())
    assert history["run"]["resumed_at_round"] == [1]


def test_a_run_held_by_a_live_process_is_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text(str(os.getppid()))  # a live process that is not this one
    with run_lock(folder) as mine:
        assert mine is False
    (folder / ".lock").write_text("999999999")  # a dead process: its stale lock is taken over
    with run_lock(folder) as mine:
        assert mine is True
    assert not (folder / ".lock").exists()


def test_the_tuning_protocol_never_sees_a_test_record(tmp_path: Path, tiny_dataset: Dataset) -> None:
    from bench.tune import inner_dataset
    from genseg_fed.local import load_split

    inner = inner_dataset(tiny_dataset, TINY, tmp_path / "res")
    outer_cfg = common.load_experiment(tiny_dataset, ["data.n_train=null"])
    inner_cfg = common.load_experiment(inner, ["data.n_train=2"])
    assert [s.name for s in inner_cfg.data.sites] == [s.name for s in outer_cfg.data.sites]
    assert inner_cfg.data.heldout == ()  # the held-out site is not used for tuning
    for outer_spec, inner_spec in zip(outer_cfg.data.sites, inner_cfg.data.sites, strict=True):
        outer = load_split(outer_cfg, outer_spec)
        files = {p.stem for p in (Path(inner_spec.path) / "images").iterdir()}
        assert files == set(outer.train.ids) | set(outer.val.ids)
        assert not files & set(outer.test.ids)


def test_per_volume_dice_equals_per_image_dice_when_every_image_is_its_own_volume(
    tiny_dataset: Dataset,
) -> None:
    import torch

    from genseg_fed.evaluation.metrics import evaluate_segmenter
    from genseg_fed.fed.weights import shared_weights
    from genseg_fed.local import load_split
    from genseg_fed.mlo.trainer import build_networks

    cfg = common.load_experiment(tiny_dataset, ["device=cpu"])
    torch.manual_seed(0)
    seg = build_networks(cfg.model, channels=1, image_size=cfg.data.image_size, mode="seg-only").segmenter
    with torch.no_grad():  # a segmenter that predicts something: a positive bias on the output
        list(seg.parameters())[-1].add_(2.0)
    scores = common.volume_dice(cfg, {"m": shared_weights({"segmenter": seg}, ["segmenter"])})["m"]
    assert set(scores) == {"site-a", "site-b", "site-c"}
    test = load_split(cfg, cfg.data.sites[0]).test
    expected = evaluate_segmenter(seg, test.images, test.masks, device=torch.device("cpu")).dice.mean()
    assert scores["site-a"] == pytest.approx(expected, abs=1e-6)


def test_local_models_merge_into_one_method_like_the_cross_site_matrix() -> None:
    per_model = {
        "fedavg-x": {"a": 0.5, "b": 0.4, "h": 0.3},
        "local-x@a": {"a": 0.8, "b": 0.2, "h": 0.3},
        "local-x@b": {"a": 0.1, "b": 0.6, "h": 0.5},
    }
    merged = common._merge_local(per_model, {"train": ["a", "b"], "heldout": ["h"]})
    assert merged == {
        "fedavg-x": per_model["fedavg-x"],
        "local-x": pytest.approx({"a": 0.8, "b": 0.6, "h": 0.4}),
    }
