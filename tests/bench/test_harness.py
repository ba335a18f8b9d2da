"""The benchmark harness: statistics, the data-efficiency factor, result extraction and resumable runs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
from conftest import write_tiny_experiment

from bench import common
from bench.common import (
    Dataset,
    RunKey,
    Size,
    StaleResultError,
    fed_methods,
    method_rows,
    per_seed_scores,
    run_job,
    run_lock,
)
from bench.stats import (
    Estimate,
    across_splits,
    crossing_n,
    efficiency_factor,
    holm,
    paired_difference,
    t_quantile,
)
from genseg_fed.config import AugmentConfig

# ----------------------------------------------------------------------------------------- statistics


def test_estimate_mean_std_and_t_interval() -> None:
    est = Estimate.of([1.0, 2.0, 3.0])
    half = 4.302653 * 1.0 / math.sqrt(3)  # t_{0.975, 2} (tables: 4.303) * sample std / sqrt(n)
    assert (est.mean, est.std, est.n) == (2.0, 1.0, 3)
    assert est.lo == pytest.approx(2.0 - half, abs=1e-6) and est.hi == pytest.approx(2.0 + half, abs=1e-6)


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
    curve = {n: {0: 0.5, 1: 0.55} for n in (9, 20, 50)}
    f = efficiency_factor(curve, {0: 0.9, 1: 0.9}, base_n=9)
    assert f["grid"] is None and f["interpolated"] is None
    assert f["lower_bound"] == pytest.approx(50 / 9)
    assert f["bootstrap"]["censored"] == f["bootstrap"]["draws"]
    assert f["bootstrap"]["lo"] == f["bootstrap"]["hi"] == pytest.approx(50 / 9)  # censored draws: the bound
    single = efficiency_factor({n: {0: 0.5} for n in (9, 20)}, {0: 0.9}, base_n=9)
    assert single["per_seed"] == {0: None} and single["bootstrap"] is None  # one seed: nothing to resample


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


# ----------------------------------------------------------------------------- protocol: which images each run reads

HAS_CLASSIC = "classic" in {f.name for f in dataclasses.fields(AugmentConfig)}
needs_classic = pytest.mark.skipif(
    not HAS_CLASSIC,
    reason="augment.classic (classic augmentation of the real pairs) is not a field of this checkout's "
    "AugmentConfig yet; the jobs that use it are defined and run once the trainer has it",
)
ONE_ROUND = Size("one-round", ("federation.rounds=1", "federation.local_iterations=1"), seeds=(0,), ns=(4,))


def _job_params() -> list:
    return [
        pytest.param(name, marks=needs_classic)
        if any(o.startswith("augment.classic") for o in job.overrides)
        else name
        for name, job in common.JOBS.items()
    ]


def test_n_counts_training_plus_validation_images_and_each_seed_resamples_them(tiny_dataset: Dataset) -> None:
    job = common.JOBS["fedavg-genseg"]
    overrides = common.experiment_overrides(tiny_dataset, TINY, job, 4, 3, [])
    assert "data.n_train=2" in overrides and "data.subset_seed=3" in overrides  # n_val = 2
    with pytest.raises(ValueError, match="N counts training \\+ validation"):
        common.experiment_overrides(tiny_dataset, TINY, job, 2, 0, [])


def test_two_seeds_label_different_images_with_the_same_test_split(tiny_dataset: Dataset) -> None:
    from genseg_fed.local import load_split

    job = common.JOBS["fedavg-seg-only"]
    cfgs = [
        common.load_experiment(
            tiny_dataset, common.experiment_overrides(tiny_dataset, TINY, job, 4, seed, [])
        )
        for seed in (0, 1)
    ]
    labelled = [common.labelled_images(cfg) for cfg in cfgs]
    for spec in cfgs[0].data.sites:
        first, second = (load_split(cfg, spec) for cfg in cfgs)
        assert first.test.ids == second.test.ids, "the test split must not move with the seed"
        assert len(labelled[0][spec.name]) == len(labelled[1][spec.name]) == 4
        assert not set(labelled[0][spec.name]) & set(first.test.ids)
    assert labelled[0] != labelled[1], "seeds 0 and 1 must label different images"


@pytest.mark.parametrize("job_name", _job_params())
def test_every_method_reads_exactly_the_same_labelled_images(
    tmp_path: Path, tiny_dataset: Dataset, monkeypatch, job_name: str
) -> None:
    """Whatever a job trains (federated sites, their local-only models, a pooled model), every trainer it
    builds reads exactly the labelled images of the (dataset, N, seed): methods without level III train
    on all of them, genseg trains on the training part and reads the validation part at level III.
    Each run also records its CPU and wall time, and each method's training time."""
    from genseg_fed.mlo import trainer as trainer_module

    seed, n = 1, 4
    expected_cfg = common.load_experiment(
        tiny_dataset,
        common.experiment_overrides(tiny_dataset, ONE_ROUND, common.JOBS["fedavg-genseg"], n, seed, []),
    )
    expected = {site: set(ids) for site, ids in common.labelled_images(expected_cfg).items()}
    reads: list[tuple[str, set, set]] = []
    real_init = trainer_module.GenSegTrainer.__init__

    def recording_init(self, mlo, networks, train, val, *args, **kwargs):
        def by_site(data) -> set:
            if data.name == "pooled":  # pooled ids are "<site>/<id>"
                return {tuple(i.split("/", 1)) for i in data.ids}
            return {(data.name, i) for i in data.ids}

        reads.append((mlo.mode, by_site(train), by_site(val)))
        real_init(self, mlo, networks, train, val, *args, **kwargs)

    monkeypatch.setattr(trainer_module.GenSegTrainer, "__init__", recording_init)
    job = common.JOBS[job_name]
    result = run_job(tmp_path / "res", tiny_dataset, ONE_ROUND, job, n, seed, progress=False)
    assert {site: set(ids) for site, ids in result["labelled"].items()} == expected
    assert reads, "no trainer was built"
    everything = {(site, i) for site, ids in expected.items() for i in ids}
    for mode, train, val in reads:
        sites = {site for site, _ in train}
        assert train | val == {(s, i) for s, i in everything if s in sites}
        assert not train & val
        if mode == "genseg":
            assert len(val) == 2 * len(sites)  # data.n_val = 2 per site, read only at level III
        else:
            assert not val
    if job.kind == "pooled":
        assert {site for _, train, _ in reads for site, _ in train} == set(expected)
    # cost: the run's process CPU and wall time, and each method's training time (site-side, all sites)
    assert result["cpu_seconds"] > 0 and result["seconds"] > 0
    assert set(result["cost"]) == set(job.yields)
    for cost in result["cost"].values():
        assert 0 < cost["train_cpu_seconds"] < result["cpu_seconds"] and cost["train_seconds"] > 0


def test_a_study_with_an_override_this_checkout_lacks_stops_before_running(tiny_dataset: Dataset) -> None:
    from genseg_fed.config import ConfigError

    bad = common.Job("x", "fed", ("augment.no_such_key=true",), ("x",))
    with pytest.raises(ConfigError, match=r"tiny / x: unknown key\(s\) \['augment.no_such_key'\]"):
        common.check_plan([tiny_dataset], TINY, [common.JOBS["fedavg-seg-only"], bad], [])


@needs_classic
def test_classic_jobs_turn_on_classic_augmentation(tiny_dataset: Dataset) -> None:
    for name in ("fedavg-seg-only-classic", "pooled-seg-only-classic"):
        job = common.JOBS[name]
        cfg = common.load_experiment(
            tiny_dataset, common.experiment_overrides(tiny_dataset, TINY, job, 4, 0, [])
        )
        assert cfg.augment.classic is True and cfg.mlo.mode == "seg-only"
    plain = common.load_experiment(
        tiny_dataset,
        common.experiment_overrides(tiny_dataset, TINY, common.JOBS["fedavg-seg-only"], 4, 0, []),
    )
    assert plain.augment.classic is False


# ----------------------------------------------------------------------------- corrections across splits


def test_t_quantile_comes_from_scipy() -> None:
    assert t_quantile(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(7) == pytest.approx(2.3646, abs=1e-4)  # 8 seeds
    assert t_quantile(100) == pytest.approx(1.984, abs=1e-3)  # not the normal 1.96


def test_holm_adjusts_step_down_and_keeps_order() -> None:
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": math.nan})
    assert adjusted["a"] == pytest.approx(0.03)  # 3 x 0.01
    assert adjusted["c"] == pytest.approx(0.06)  # 2 x 0.03
    assert adjusted["b"] == pytest.approx(0.06)  # max(1 x 0.04, the previous 0.06)
    assert math.isnan(adjusted["d"])


def test_across_splits_widens_intervals_by_bonferroni_and_adjusts_p_by_holm() -> None:
    per = {f"split{i}": {s: 0.6 + 0.01 * s + 0.02 * i for s in range(8)} for i in range(3)}
    ref = {f"split{i}": {s: 0.55 + 0.012 * s for s in range(8)} for i in range(3)}
    out = across_splits(per, ref)
    assert set(out) == set(per)
    for split, c in out.items():
        plain, wide = c["estimate"], c["bonferroni"]
        assert plain.mean == pytest.approx(wide.mean)
        assert wide.lo < plain.lo and wide.hi > plain.hi
        assert wide.confidence == pytest.approx(1 - 0.05 / 3)
        assert c["p_holm"] >= plain.p and c["m"] == 3
        assert plain == paired_difference(per[split], ref[split])


# ----------------------------------------------------------------------------- convergence study


@pytest.mark.parametrize(
    ("dice", "at"),
    [
        ([0.3, 0.6, 0.75, 0.80, 0.805, 0.80, 0.81], 400),  # then never more than 0.01 higher
        ([0.3, 0.6, 0.70, 0.72, 0.74, 0.76, 0.78], 700),  # still rising: the last point
        ([0.8, 0.79, 0.805, 0.80, 0.80, 0.80, 0.80], 100),  # flat from the start
    ],
)
def test_plateau_is_where_the_curve_stops_rising(dice, at) -> None:
    from bench.convergence import plateau

    assert plateau([100 * (i + 1) for i in range(len(dice))], dice, delta=0.01) == at


def test_convergence_summary_states_the_budget_in_iterations_and_epochs(tmp_path: Path) -> None:
    from bench.convergence import summarise

    def result(seed: int, rise_until: int) -> dict:
        rounds = [
            {"round": r, "dice": {"a": min(r, rise_until) / 10 + 0.01 * seed, "b": min(r, rise_until) / 10}}
            for r in range(1, 9)
        ]
        overrides = ["federation.rounds=8", "federation.local_iterations=50"]
        return {
            "dataset": "d",
            "job": "fedavg-seg-only",
            "n": 9,
            "seed": seed,
            "sites": {"train": ["a", "b"], "heldout": []},
            "overrides": overrides,
            "rounds": rounds,
        }

    short = common.Budget(rounds=4, local_iterations=50)
    summary = summarise([result(0, 6), result(1, 6)], tmp_path, budget=short, batch_size=4)
    (row,) = summary["plateaus"]
    assert row["plateau_iterations"] == 300 and row["plateau_epochs"] == pytest.approx(300 * 4 / 9)
    assert row["budget_is_past_plateau"] is False
    assert summary["recommended"] == {"rounds": 6, "local_iterations": 50, "iterations": 300}
    assert "SHORT" in summary["verdict"]
    assert (tmp_path / "convergence.png").is_file() and "epochs" in (tmp_path / "tables.md").read_text()
    long = summarise([result(0, 6), result(1, 6)], tmp_path, budget=common.Budget(8, 50), batch_size=4)
    assert long["plateaus"][0]["budget_is_past_plateau"] is True and "at or past" in long["verdict"]


def test_accuracy_tables_correct_across_the_splits_and_report_cpu_cost(tmp_path: Path) -> None:
    from bench.accuracy import summarise

    results = []
    for d, dataset in enumerate(("skin-loso-dermis", "skin-loso-ph2", "skin-loso-dermquest")):
        for seed in range(4):
            for job, method, gain, cpu in (
                ("fedavg-seg-only", "fedavg-seg-only", 0.0, 10.0),
                ("fedavg-genseg", "fedavg-genseg", 0.03 + 0.01 * d, 120.0),
            ):
                dice = 0.6 + 0.02 * seed + gain + (0.004 * seed if gain else 0.0)
                results.append(
                    {
                        "dataset": dataset,
                        "job": job,
                        "n": 9,
                        "seed": seed,
                        "sites": {"train": ["a", "b"], "heldout": ["h"]},
                        "methods": {method: {"a": dice, "b": dice, "h": dice - 0.1}},
                        "cost": {method: {"train_cpu_seconds": cpu + seed, "train_seconds": 2 * cpu}},
                        "cpu_seconds": cpu * 3,
                        "seconds": cpu * 6,
                    }
                )
    summary = summarise(results, tmp_path, methods=["fedavg-seg-only", "fedavg-genseg"], size_label="test")
    rows = [r for r in summary["_across_splits"] if r["target"] == "train_mean"]
    assert {r["dataset"] for r in rows} == {"skin-loso-dermis", "skin-loso-ph2", "skin-loso-dermquest"}
    for r in rows:
        assert r["splits"] == 3 and r["bonferroni_lo"] < r["ci95_lo"] and r["p_holm"] >= r["p"]
    ratios = {
        r["method"]: r["cpu_ratio_to_reference"] for r in summary["_cost"] if r["dataset"] == "skin-loso-ph2"
    }
    assert ratios["fedavg-seg-only"] == pytest.approx(1.0)
    assert ratios["fedavg-genseg"] == pytest.approx(sum((120 + s) / (10 + s) for s in range(4)) / 4)
    text = (tmp_path / "tables.md").read_text()
    assert "Bonferroni" in text and "Holm" in text and "training CPU s" in text
    assert (tmp_path / "accuracy_skin-loso-ph2_n9.png").is_file()
