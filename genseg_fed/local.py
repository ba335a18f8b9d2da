"""Single-site GenSeg training (``genseg-fed train-local``): train, checkpoint, evaluate, write a run folder.

The run folder holds ``config.yaml`` (the resolved config), ``checkpoint.pt`` (resumable trainer
state, rewritten every ``mlo.checkpoint_every`` iterations), ``segmenter.pt`` / ``generator.pt``
(final weights), ``metrics.json`` and ``samples.png`` (mask | synthetic image | real image |
prediction for test images).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint, write_json_atomic
from .config import Config, SiteSpec, config_to_dict
from .data import Augmenter, SiteData, SiteSplit, load_site, split_for_training
from .evaluation.metrics import evaluate_segmenter, predict_masks
from .evaluation.plots import sample_grid
from .mlo.trainer import GenSegTrainer, Networks, build_networks
from .runtime import resolve_device, seed_everything

__all__ = ["load_split", "train_local", "train_pooled", "write_samples"]

logger = logging.getLogger(__name__)


def load_split(cfg: Config, site: SiteSpec) -> SiteSplit:
    """Load one site and split it as the config says, with the fair data-access rule applied
    (a mode without level III trains on the validation split too: ``split_for_training``)."""
    data = load_site(
        site, image_size=cfg.data.image_size, channels=cfg.data.channels, empty_masks=cfg.data.empty_masks
    )
    return split_for_training(data, cfg)


@torch.no_grad()
def write_samples(path: Path, nets: Networks, split: SiteSplit, *, device: torch.device, title: str) -> Path:
    """PNG grid of test images: mask, synthetic image from that mask, real image, prediction."""
    data = split.test if len(split.test) else split.train
    n = min(6, len(data))
    masks, images = data.masks[:n], data.images[:n]
    columns: dict[str, np.ndarray] = {"mask": masks}
    if nets.generator is not None:
        nets.generator.eval()
        columns["synthetic"] = nets.generator(torch.as_tensor(masks, device=device)).cpu().numpy()
        nets.generator.train()
    columns["real"] = images
    columns["prediction"] = predict_masks(nets.segmenter, images, device=device).numpy()
    return sample_grid(path, columns=columns, title=title)


def train_local(
    cfg: Config, site: SiteSpec, out_dir: str | Path, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train GenSeg (or a baseline mode) on one site and evaluate on its test split.

    Returns the metrics dict also written to ``out_dir/metrics.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)

    split = load_split(cfg, site)
    logger.info(
        "site %s: %d train / %d val / %d test images (%s)",
        site.name,
        len(split.train),
        len(split.val),
        len(split.test),
        split.train.description,
    )
    nets = build_networks(
        cfg.model, channels=cfg.data.channels, image_size=cfg.data.image_size, mode=cfg.mlo.mode
    )
    args = (cfg.mlo, nets, split.train, split.val, Augmenter(cfg.augment, seed=cfg.seed))
    trainer: GenSegTrainer
    if cfg.privacy.enabled:
        from .privacy.trainer import PrivateGenSegTrainer  # imports Opacus: only when private

        epsilon, delta = cfg.privacy.budget(site.name)
        trainer = PrivateGenSegTrainer(
            *args,
            device=device,
            seed=cfg.seed,
            privacy=cfg.privacy,
            epsilon=epsilon,
            delta=delta,
            planned_iterations=cfg.mlo.iterations,
        )
    else:
        trainer = GenSegTrainer(*args, device=device, seed=cfg.seed)
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.exists():
        trainer.load_state_dict(load_checkpoint(ckpt))
        logger.info("resumed from %s at iteration %d", ckpt, trainer.iteration)

    total = cfg.mlo.iterations
    chunk = cfg.mlo.checkpoint_every or total
    train_stats: dict[str, float] = {}
    started, cpu_started = time.perf_counter(), time.process_time()
    with tqdm(
        total=trainer.pretrain_steps + total,
        initial=trainer.iteration,
        desc=f"{site.name} [{cfg.mlo.mode}]",
        disable=not progress,
    ) as bar:
        while trainer.main_iteration < total or trainer.iteration < trainer.pretrain_steps:
            steps = min(chunk, total - trainer.main_iteration)
            train_stats = trainer.train(steps, bar=bar)
            save_checkpoint(trainer.state_dict(), ckpt)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started

    scores = evaluate_segmenter(nets.segmenter, split.test.images, split.test.masks, device=device)
    for name, net in nets.parts().items():
        if name != "discriminator":
            torch.save(net.state_dict(), out / f"{name}.pt")
    write_samples(out / "samples.png", nets, split, device=device, title=f"{site.name}: {cfg.mlo.mode}")
    metrics = {
        "site": site.name,
        "mode": cfg.mlo.mode,
        "segmenter": cfg.model.segmenter,
        "device": str(device),
        "iterations": trainer.main_iteration,
        "pretrain_iterations": trainer.pretrain_steps,
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,  # this process (all its threads), this invocation
        "counts": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "data": split.train.description,
        "simulated_shift": split.train.simulated_shift,
        "train_last_chunk": train_stats,
        "val_loss": trainer.validation_loss() if len(split.val) else None,
        "generator_check": trainer.generator_check(),
        "privacy": trainer.report() if cfg.privacy.enabled else None,
        "test": scores.summary(),
        "test_per_image": {
            "ids": list(split.test.ids),
            "dice": scores.dice.tolist(),
            "hd95": scores.hd95.tolist(),
        },
    }
    write_json_atomic(metrics, out / "metrics.json")
    return metrics


def train_pooled(cfg: Config, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Upper-bound baseline: pool every site's train and validation splits, train one model centrally,
    and test it on each site's own test split and on every held-out site (all of its images).

    Each site's split follows the fair data-access rule (see :func:`load_split`), so a pooled model
    reads exactly the labelled images the federated sites read."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    splits = {s.name: load_split(cfg, s) for s in cfg.data.sites}
    train = SiteData.concat([sp.train for sp in splits.values()], "pooled")
    val = SiteData.concat([sp.val for sp in splits.values()], "pooled")
    tests = {name: sp.test for name, sp in splits.items()}
    for spec in cfg.data.heldout:
        tests[spec.name] = load_site(
            spec, image_size=cfg.data.image_size, channels=cfg.data.channels, empty_masks=cfg.data.empty_masks
        )
    nets = build_networks(
        cfg.model, channels=cfg.data.channels, image_size=cfg.data.image_size, mode=cfg.mlo.mode
    )
    augmenter = Augmenter(cfg.augment, seed=cfg.seed)
    trainer = GenSegTrainer(cfg.mlo, nets, train, val, augmenter, device=device, seed=cfg.seed)
    started, cpu_started = time.perf_counter(), time.process_time()
    with tqdm(total=cfg.mlo.iterations, desc=f"pooled [{cfg.mlo.mode}]", disable=not progress) as bar:
        trainer.train(cfg.mlo.iterations, bar=bar)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    per_site = {
        name: evaluate_segmenter(nets.segmenter, data.images, data.masks, device=device).summary()
        for name, data in tests.items()
    }
    torch.save(nets.segmenter.state_dict(), out / "segmenter.pt")
    metrics = {
        "mode": cfg.mlo.mode,
        "iterations": cfg.mlo.iterations,
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,
        "counts": {"train": len(train), "val": len(val)},
        "heldout": [s.name for s in cfg.data.heldout],
        "test": per_site,
    }
    write_json_atomic(metrics, out / "metrics.json")
    return metrics
