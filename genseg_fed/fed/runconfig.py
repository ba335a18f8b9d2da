"""Experiment config and site identity from Flower's run config and node config.

Run config (``[tool.flwr.app.config]``, overridable with ``flwr run --run-config``):

* ``config``: YAML experiment file; a relative path is taken from the app folder.
* ``overrides``: ``key=value`` overrides separated by ``;`` (e.g. ``"federation.rounds=2;data.n_train=20"``).
* ``out-dir``: where the coordinator writes the run folder.
* ``state-dir``: where simulated sites keep their on-site state.
* ``resume``: continue from ``out-dir/checkpoint.pt``.

Node config (``flower-supernode --node-config``), set by each hospital:

* ``site-name``: the site's name in the experiment (``data.sites`` or ``data.heldout``).
* ``data-path``: the hospital's own site folder (``images/`` + ``masks/``); overrides the config's source.
* ``orientation``: slicing axis for NIfTI volumes in ``data-path`` (default ``axial``).
* ``state-dir``: on-site folder for the site's training state (default ``~/.genseg-fed/state``).

In simulation a node has only ``partition-id``; partition *i* is the *i*-th site of
``data.sites + data.heldout``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ..config import Config, ConfigError, SiteSpec, load_config

__all__ = [
    "APP_DIR",
    "SiteAssignment",
    "experiment_config",
    "parse_overrides",
    "site_for_node",
    "site_state_dir",
]

APP_DIR = Path(__file__).resolve().parents[2]  # the checkout, or the unpacked Flower app bundle
DEFAULT_STATE_DIR = Path("~/.genseg-fed/state")

Role = Literal["train", "heldout"]


@dataclass(frozen=True)
class SiteAssignment:
    """Which site a node is and whether it trains or only tests (held-out site)."""

    spec: SiteSpec
    role: Role


def parse_overrides(text: str) -> list[str]:
    """``"a.b=1; c=[1, 2]"`` -> ``["a.b=1", "c=[1, 2]"]`` (also accepts newlines)."""
    return [part.strip() for chunk in text.splitlines() for part in chunk.split(";") if part.strip()]


def experiment_config(run_config: Mapping[str, Any]) -> Config:
    """The experiment config a run was started with (same on the coordinator and every site)."""
    path = Path(str(run_config.get("config", "configs/default.yaml"))).expanduser()
    if not path.is_absolute():
        path = APP_DIR / path
    return load_config(path, parse_overrides(str(run_config.get("overrides", ""))))


def site_for_node(cfg: Config, node_config: Mapping[str, Any]) -> SiteAssignment:
    """Resolve a node's site from its node config (deployment) or partition id (simulation)."""
    train = {s.name: s for s in cfg.data.sites}
    heldout = {s.name: s for s in cfg.data.heldout}
    if "site-name" in node_config:
        name = str(node_config["site-name"])
        if name not in train and name not in heldout:
            raise ConfigError(
                f"node config site-name={name!r} is not in the experiment; "
                f"training sites {sorted(train)}, held-out sites {sorted(heldout)}"
            )
        role: Role = "train" if name in train else "heldout"
        spec = train.get(name) or heldout[name]
        if "data-path" in node_config:
            spec = replace(
                spec,
                source="folder",
                path=str(node_config["data-path"]),
                key=None,
                profile=None,
                orientation=str(node_config.get("orientation", "axial")),
            )
        return SiteAssignment(spec, role)
    if "partition-id" in node_config:
        sites = [*cfg.data.sites, *cfg.data.heldout]
        pid = int(node_config["partition-id"])
        if not 0 <= pid < len(sites):
            raise ConfigError(
                f"simulation node partition-id={pid} has no site: the experiment has {len(sites)} sites "
                f"({[s.name for s in sites]}); use num-supernodes={len(sites)}"
            )
        spec = sites[pid]
        return SiteAssignment(spec, "train" if pid < len(cfg.data.sites) else "heldout")
    raise ConfigError('node config must name the site: --node-config \'site-name="..." data-path="..."\'')


def site_state_dir(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> Path:
    """The site's on-site state folder: node config first, then run config (simulation), then the default."""
    raw = node_config.get("state-dir") or run_config.get("state-dir") or DEFAULT_STATE_DIR
    return Path(str(raw)).expanduser()
