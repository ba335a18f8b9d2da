"""Typed experiment configuration: YAML files validated into frozen dataclasses.

A config is loaded once (``load_config``) and then passed around as small typed pieces
(``cfg.data``, ``cfg.mlo`` ...). Unknown keys and bad values raise :class:`ConfigError`
naming the full key (``mlo.inner_lr``) and, for choices, the allowed values.

Command-line overrides use dotted keys whose values are parsed as YAML::

    load_config("configs/default.yaml", ["mlo.inner_lr=1e-3", "data.n_train=20"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FederationConfig",
    "MLOConfig",
    "ModelConfig",
    "PrivacyConfig",
    "SiteBudget",
    "SiteSpec",
    "config_to_dict",
    "load_config",
    "parse_config",
]

Mode = Literal["seg-only", "aug", "genseg"]
SegmenterName = Literal["unet", "attention_unet", "swin_unetr"]
HyperParams = Literal["arch", "decoder", "all", "pairs"]
HyperEstimator = Literal["exact", "fd"]
SourceName = Literal["folder", "mni152", "npz"]
Orientation = Literal["axial", "coronal", "sagittal"]
EmptyMaskPolicy = Literal["error", "skip", "keep"]
StrategyName = Literal["fedavg", "fedprox", "fedadam"]
SharedPart = Literal["segmenter", "generator"]
RobustAggregation = Literal["none", "trimmed_mean", "median"]
CentralDP = Literal["none", "server", "client"]


class ConfigError(ValueError):
    """A configuration key is unknown, missing or holds a bad value."""


def _min(value: float) -> dict[str, float]:
    return {"min": value}


def _range(lo: float, hi: float) -> dict[str, float]:
    return {"min": lo, "max": hi}


@dataclass(frozen=True)
class SiteSpec:
    """Where one hospital's labelled images come from.

    ``source`` picks the reader: ``folder`` (``path/images`` + ``path/masks`` paired by file
    name; PNG/JPG/TIFF or NIfTI volumes sliced along ``orientation``), ``npz`` (arrays
    ``<key>_images`` / ``<key>_masks`` in the file at ``path``) or ``mni152`` (the embedded
    default: slices of the MNI152 brain template shipped in nilearn, with a *simulated*
    acquisition ``profile``). ``path`` may use ``~`` and ``$VARS``.

    ``patient_pattern`` groups records into patients by their ids (a folder's ``patients.csv`` does the
    same for a folder); see :mod:`genseg_fed.data.patients`.

    For ``npz`` sites, ``records`` (``"start:stop"``, Python slice syntax) keeps only those records
    (images or volumes) of the file, so one file can be split into several sites, and ``profile``
    applies a *simulated* acquisition profile (``genseg_fed.data.mni152.PROFILES``) on top of the
    real images; the site is then marked as having a simulated shift.
    """

    name: str
    source: SourceName = "folder"
    path: str | None = None
    key: str | None = None  # array prefix inside an .npz, e.g. "PH2"
    orientation: Orientation = "axial"  # slicing axis for volumes
    profile: str | None = None  # simulated acquisition profile (mni152; npz: on top of the real images)
    records: str | None = None  # npz only: "start:stop[:step]" slice of the file's records (images / volumes)
    patient_pattern: str | None = (
        None  # regex; group 1 of a record id = its patient (genseg_fed.data.patients)
    )

    def __post_init__(self) -> None:
        if self.records is not None:
            self.record_slice()
        if self.patient_pattern is not None:
            try:
                groups = re.compile(self.patient_pattern).groups
            except re.error as exc:
                raise ConfigError(
                    f"site '{self.name}': patient_pattern is not a valid regex: {exc}"
                ) from None
            if groups < 1:
                raise ConfigError(
                    f"site '{self.name}': patient_pattern {self.patient_pattern!r} needs a group capturing the "
                    "patient id, e.g. '^(.+?)(?:_\\d+)?$'"
                )

    def record_slice(self) -> slice:
        """``records`` as a ``slice`` (all records when unset); ConfigError on a malformed value."""
        if self.records is None:
            return slice(None)
        parts = self.records.split(":")
        try:
            if not 2 <= len(parts) <= 3:
                raise ValueError
            values = [int(p) if p.strip() else None for p in parts]
        except ValueError:
            raise ConfigError(
                f"site '{self.name}': records {self.records!r} must look like 'start:stop' or 'start:stop:step' "
                "(integers, Python slice syntax, e.g. '0:52')"
            ) from None
        if len(values) == 3 and values[2] is not None and values[2] < 1:
            raise ConfigError(f"site '{self.name}': records step must be >= 1, got {values[2]}")
        return slice(*values)

    def resolved_path(self) -> Path:
        """``path`` with ``~`` and environment variables expanded; clear error if unset."""
        if not self.path:
            raise ConfigError(f"site '{self.name}': source '{self.source}' needs a 'path'")
        expanded = os.path.expanduser(os.path.expandvars(self.path))
        missing = re.findall(r"\$\{?(\w+)\}?", expanded)
        if missing:
            raise ConfigError(
                f"site '{self.name}': path '{self.path}' uses environment variable(s) "
                f"{', '.join(missing)} which are not set"
            )
        return Path(expanded)


def _default_sites() -> tuple[SiteSpec, ...]:
    return (
        SiteSpec("hospital-a", "mni152", orientation="axial", profile="scanner-a"),
        SiteSpec("hospital-b", "mni152", orientation="coronal", profile="scanner-b"),
        SiteSpec("hospital-c", "mni152", orientation="sagittal", profile="scanner-c"),
    )


def _default_heldout() -> tuple[SiteSpec, ...]:
    return (SiteSpec("hospital-d", "mni152", orientation="axial", profile="scanner-d"),)


@dataclass(frozen=True)
class DataConfig:
    """Sites, image geometry and the per-site train / validation / test split.

    Each site labels ``n_train + n_val`` groups. Methods without level III train on the validation
    groups too (the fair data-access rule, ``genseg_fed.data.splits.training_split``).
    """

    image_size: int = field(default=64, metadata=_range(16, 1024))  # square side, pixels
    channels: Literal[1, 3] = 1  # images are converted to this many channels
    sites: tuple[SiteSpec, ...] = field(default_factory=_default_sites)  # sites that train
    heldout: tuple[SiteSpec, ...] = field(default_factory=_default_heldout)  # test-only sites
    n_train: int | None = field(default=9, metadata=_min(1))  # None: all that remain
    n_val: int = field(default=3, metadata=_min(1))  # feeds level III (others train on it), stays on site
    test_fraction: float = field(default=0.4, metadata=_range(0.0, 0.9))
    split_seed: int = 0  # fixes the test split
    subset_seed: int | None = None  # reshuffles WHICH non-test images are labelled; None: split_seed's order
    empty_masks: EmptyMaskPolicy = "error"  # what to do with an all-background mask


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation (``genseg_fed.data.augment``): one spatial transform for new masks and classic pairs,
    and intensity jitter for real (``classic``) and synthetic (``synthetic_intensity``) images."""

    flip_prob: float = field(default=0.5, metadata=_range(0.0, 1.0))
    rotate_deg: float = field(default=20.0, metadata=_range(0.0, 180.0))
    scale: float = field(default=0.15, metadata=_range(0.0, 0.9))  # +-fraction
    translate: float = field(default=0.1, metadata=_range(0.0, 0.5))  # +-fraction of size
    shear: float = field(default=0.1, metadata=_range(0.0, 1.0))
    elastic_prob: float = field(default=0.3, metadata=_range(0.0, 1.0))
    classic: bool = True  # classic augmentation of the real pairs (spatial + intensity) at level II
    synthetic_intensity: bool = True  # intensity jitter on synthetic images (a variety of tones)
    brightness: float = field(default=0.1, metadata=_range(0.0, 1.0))  # +- shift, fraction of range
    contrast: float = field(default=0.2, metadata=_range(0.0, 0.9))  # +-fraction
    gamma: float = field(default=0.2, metadata=_range(0.0, 2.0))  # log-gamma +-
    saturation: float = field(default=0.2, metadata=_range(0.0, 1.0))  # +-fraction (RGB only)
    channel_gain: float = field(default=0.05, metadata=_range(0.0, 0.5))  # +-fraction per channel


@dataclass(frozen=True)
class ModelConfig:
    """Network choices; every network is Opacus-compatible (no BatchNorm)."""

    segmenter: SegmenterName = "unet"
    seg_features: tuple[int, ...] = (16, 32, 64, 128)  # channels per resolution level
    gen_features: int = field(default=16, metadata=_min(4))  # generator base width
    gen_depth: int = field(default=3, metadata=_range(2, 6))  # down-sampling steps
    gen_ops: tuple[str, ...] = ("conv3x3", "conv5x5", "dil3x3")  # candidate decoder ops
    disc_features: int = field(default=16, metadata=_min(4))
    disc_layers: int = field(default=3, metadata=_range(1, 5))
    gen_dropout: float = field(default=0.0, metadata=_range(0.0, 0.9))  # stochastic synthetic images


@dataclass(frozen=True)
class MLOConfig:
    """The GenSeg multi-level optimisation (levels I, II, III) and its baselines.

    ``mode``: ``seg-only`` trains the segmenter on real pairs only; ``aug`` also trains the
    generator as a plain pix2pix and feeds its synthetic pairs to the segmenter; ``genseg``
    adds level III, updating ``hyper_params`` by the hypergradient of the segmenter's validation
    loss. ``genseg_fed.mlo.schedule`` is the one place that says which level runs when.

    Phases: ``pretrain_iterations`` level-I-only steps (generator and discriminator, no segmenter)
    run before the first main iteration, so synthetic pairs never come from an untrained generator;
    they are extra to ``iterations`` / ``federation.local_iterations`` and counted in every cost.
    After that, level I runs every ``gen_every`` iterations at ``gen_finetune_lr``, and a pool of
    ``pool_size`` synthetic pairs per real pair is re-rendered every ``pool_refresh`` iterations.
    """

    mode: Mode = "genseg"
    iterations: int = field(default=300, metadata=_min(0))
    batch_size: int = field(default=4, metadata=_min(1))  # real pairs per step
    synthetic_per_real: int = field(default=1, metadata=_min(0))  # synthetic rows per real row, level II
    seg_lr: float = field(default=1e-3, metadata=_min(0.0))
    gen_lr: float = field(default=2e-4, metadata=_min(0.0))  # pre-training (and level I when not set below)
    disc_lr: float = field(default=2e-4, metadata=_min(0.0))
    l1_weight: float = field(default=100.0, metadata=_min(0.0))  # pix2pix L1 term
    pretrain_iterations: int = field(default=200, metadata=_min(0))  # level I alone, before synthetic use
    gen_every: int = field(default=10, metadata=_min(0))  # level I every k iterations after; 0: frozen
    gen_finetune_lr: float | None = field(default=2e-5, metadata=_min(0.0))  # None: gen_lr
    pool_size: int = field(default=8, metadata=_min(0))  # synthetic pairs per real pair; 0: render each step
    pool_refresh: int = field(default=50, metadata=_min(1))  # re-render the pool every k iterations
    inner_lr: float = field(default=0.01, metadata=_min(0.0))  # unrolled segmenter step
    unroll_steps: int = field(default=1, metadata=_range(1, 10))
    hyper_lr: float = field(default=3e-3, metadata=_min(0.0))
    hyper_every: int = field(default=5, metadata=_min(1))  # level III every k iterations
    hyper_params: HyperParams = "arch"
    hyper_estimator: HyperEstimator = "fd"  # exact (double backward) | fd (finite differences)
    checkpoint_every: int = field(default=100, metadata=_min(0))  # 0: only at the end

    @property
    def uses_validation(self) -> bool:
        """True when training reads the validation split (level III runs).

        The one rule for fair data access: a method that does not use the validation split trains
        on it instead, so every method sees the same labelled images.
        """
        return self.mode == "genseg"


@dataclass(frozen=True)
class FederationConfig:
    """How the coordinator aggregates and what travels between sites and server."""

    rounds: int = field(default=5, metadata=_min(1))
    local_iterations: int = field(default=30, metadata=_min(1))
    strategy: StrategyName = "fedavg"
    proximal_mu: float = field(default=0.01, metadata=_min(0.0))  # FedProx
    server_lr: float = field(default=0.01, metadata=_min(0.0))  # FedAdam eta
    share: tuple[SharedPart, ...] = ("segmenter", "generator")
    local_norm: bool = False  # FedBN-style: normalisation layers never leave the site
    robust: RobustAggregation = "none"
    min_sites: int | None = field(default=None, metadata=_min(1))  # None: all sites
    wait_timeout: float = field(default=120.0, metadata=_min(0.0))  # seconds for nodes
    round_timeout: float = field(default=1800.0, metadata=_min(1.0))
    baselines: bool = True  # local-only models (same budget) for the cross-site comparison
    finetune_iterations: int = field(default=0, metadata=_min(0))  # personalised models


@dataclass(frozen=True)
class SiteBudget:
    """One site's own privacy target, overriding ``privacy.epsilon`` / ``privacy.delta``."""

    name: str
    epsilon: float = field(default=8.0, metadata=_min(0.0))
    delta: float | None = field(default=None, metadata=_range(0.0, 1.0))  # None: privacy.delta


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy of everything a site sends (see docs/privacy.md).

    ``enabled`` turns on sample-level DP at every site: DP-SGD (per-record clipping, Gaussian
    noise, Poisson sampling) on the discriminator, generator and segmenter updates, and a clipped,
    noised level-III update. One accountant per site composes them all; the noise is calibrated so
    that the planned rounds x local iterations spend exactly the site's ``(epsilon, delta)``, and a
    site whose next round would exceed it declines to train.

    ``central`` adds client-level DP at the coordinator (Flower's fixed-clipping DP wrappers):
    each site's update is clipped to ``central_clip`` (on the server or, with ``client``, on the
    site before sending) and Gaussian noise is added to the aggregate.
    """

    enabled: bool = False  # sample-level DP at every site
    epsilon: float = field(default=8.0, metadata=_min(0.0))  # per-site target over the planned run
    delta: float = field(default=1e-5, metadata=_range(0.0, 1.0))  # keep well below 1 / records
    sites: tuple[SiteBudget, ...] = ()  # per-site overrides of epsilon / delta, by site name
    noise_multiplier: float | None = field(default=None, metadata=_min(0.0))  # None: calibrated
    level3_noise_ratio: float = field(default=1.0, metadata=_min(0.0))  # sigma_III / sigma_I,II
    # Clipping norms. Measured at the default settings (64 px, UNet): median per-record gradient norm
    # ~56 (disc), ~380 (gen), ~0.55 (seg); level-III hypergradient norm ~4e-5. Adam rescales updates,
    # so a clip below the median mainly fixes the noise-to-signal ratio.
    clip_disc: float = field(default=1.0, metadata=_min(0.0))  # per-record norm, discriminator
    clip_gen: float = field(default=1.0, metadata=_min(0.0))  # per-record norm, generator weights
    clip_seg: float = field(default=1.0, metadata=_min(0.0))  # per-record norm, segmenter
    clip_hyper: float = field(default=5e-5, metadata=_min(0.0))  # norm of the whole level-III update
    send_losses: bool = False  # training losses read private records; not covered when sent
    central: CentralDP = "none"  # client-level DP at the coordinator: none | server | client
    central_noise_multiplier: float = field(default=1.0, metadata=_min(0.0))
    central_clip: float = field(default=1.0, metadata=_min(0.0))  # norm of a site's round update
    central_delta: float = field(default=1e-3, metadata=_range(0.0, 1.0))  # client-level delta
    central_max_epsilon: float | None = field(default=None, metadata=_min(0.0))  # stop beyond it

    def budget(self, site: str) -> tuple[float, float]:
        """``(epsilon, delta)`` target of ``site`` (its override, else the defaults)."""
        for b in self.sites:
            if b.name == site:
                return b.epsilon, self.delta if b.delta is None else b.delta
        return self.epsilon, self.delta


@dataclass(frozen=True)
class Config:
    """A whole experiment."""

    name: str = "default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mlo: MLOConfig = field(default_factory=MLOConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        names = [s.name for s in (*self.data.sites, *self.data.heldout)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"data.sites/data.heldout: site names must be unique, repeated: {dupes}")
        if not self.data.sites:
            raise ConfigError("data.sites: at least one training site is required")
        if self.data.image_size % 16:
            raise ConfigError(f"data.image_size: must be a multiple of 16, got {self.data.image_size}")
        if not self.federation.share:
            raise ConfigError("federation.share: share at least one of ['segmenter', 'generator']")
        self._check_privacy()

    def _check_privacy(self) -> None:
        p = self.privacy
        if not p.enabled and p.central == "none":
            return
        names = {s.name for s in self.data.sites}
        unknown = sorted({b.name for b in p.sites} - names)
        if unknown:
            raise ConfigError(
                f"privacy.sites: {unknown} are not training sites; valid names: {sorted(names)}"
            )
        clips = {k: getattr(p, k) for k in ("clip_disc", "clip_gen", "clip_seg", "clip_hyper")}
        if p.enabled and any(v <= 0 for v in clips.values()):
            raise ConfigError(f"privacy: clipping norms must be > 0, got {clips}")
        budgets = {
            "privacy.epsilon": p.epsilon,
            **{f"privacy.sites[{b.name}].epsilon": b.epsilon for b in p.sites},
        }
        bad = {k: v for k, v in budgets.items() if v <= 0}
        if p.enabled and bad:
            raise ConfigError(f"privacy: epsilon must be > 0 (use .inf for no noise), got {bad}")
        if p.enabled and p.level3_noise_ratio <= 0:
            raise ConfigError("privacy.level3_noise_ratio must be > 0 (level III is always noised)")
        if p.central != "none":
            if p.central_clip <= 0 or p.central_noise_multiplier <= 0:
                raise ConfigError("privacy.central_clip and privacy.central_noise_multiplier must be > 0")
            if self.federation.strategy not in ("fedavg", "fedprox") or self.federation.robust != "none":
                raise ConfigError(
                    "privacy.central: Flower's DP wrappers are accounted only with plain weighted "
                    "averaging; use federation.strategy fedavg or fedprox and federation.robust none"
                )


# --------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded or {}
    for item in overrides:
        _apply_override(raw, item)
    return parse_config(raw)


def parse_config(raw: Mapping[str, Any]) -> Config:
    """Validate a plain mapping (as read from YAML) into a :class:`Config`."""
    return _build(Config, raw, "")


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-able form of a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.subkey=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': value is not valid YAML: {exc}") from exc
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key(s) {[where + k for k in unknown]}; valid keys here: {sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        converted = _convert(hints[name], value, key)
        _check_range(fields[name].metadata, converted, key)
        kwargs[name] = converted
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix or 'config'}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the checks above
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _convert(a, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {inner}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")  # pragma: no cover


def _check_range(meta: Mapping[str, Any], value: Any, key: str) -> None:
    if value is None or not meta:
        return
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{key}: must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: must be <= {hi}, got {value}")
