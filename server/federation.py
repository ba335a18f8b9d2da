"""The coordinator's run: discover sites, federated rounds, checkpoints, cross-site evaluation.

Per round: train messages go to the training sites only; each reply is screened (errors,
missing keys, wrong shapes, NaN/Inf) and the accepted ones are aggregated by a Flower strategy;
then every site (training and held-out) evaluates the new global model and replies with scalars.
A checkpoint (global weights, round, strategy state, history) is written after every round, so a
killed coordinator resumes at the next round with identical weights.

After the last round, each training site trains a local-only model with the same budget (and,
if configured, fine-tunes the global model); every model is then evaluated on every site's test
images: the cross-site generalisation matrix.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

from genseg_fed.checkpoint import load_checkpoint, save_checkpoint, write_json_atomic
from genseg_fed.config import Config, config_to_dict
from genseg_fed.evaluation.report import write_report
from genseg_fed.fed.protocol import (
    BASELINE_ACTION,
    MODEL_PREFIX,
    metrics_from_record,
    nested_metrics_from_record,
    record_to_weights,
    weights_to_record,
)
from genseg_fed.fed.weights import check_update, shared_weights, split_part
from genseg_fed.mlo.trainer import build_networks
from genseg_fed.privacy.central import central_state, with_central_dp
from genseg_fed.privacy.site import METRIC_PREFIX, is_declined
from genseg_fed.progress import ProgressWriter

from .strategy import build_strategy, load_strategy_state, strategy_state

__all__ = ["FederationError", "SiteNode", "run_federation"]

logger = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_POLL_SECONDS = 0.5


class FederationError(RuntimeError):
    """The run cannot continue (e.g. not enough sites); the last checkpoint is intact."""


@dataclass
class SiteNode:
    """A connected site as it identified itself."""

    node_id: int
    name: str
    role: str
    counts: dict[str, float]
    description: str
    simulated_shift: bool


def _reason(msg: Message) -> str:
    """A short, readable error reason (Flower wraps remote tracebacks with colour codes)."""
    text = _ANSI.sub("", str(msg.error.reason))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    tail = [ln for ln in lines if "Error" in ln or "Exception" in ln]
    return (tail[-1] if tail else lines[-1] if lines else "unknown error")[:400]


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float,
    on_reply: Callable[[Message], None] | None = None,
) -> tuple[list[Message], list[int]]:
    """Send messages and collect replies until all arrive or ``timeout`` passes.

    Returns (replies, node ids that did not reply in time). Unlike ``grid.send_and_receive``
    it reports each reply as it arrives and polls every half second.
    """
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    sent = {mid: msg for mid, msg in zip(ids, messages, strict=True) if mid}
    pending = set(sent)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(pending):
            mid = reply.metadata.reply_to_message_id
            pending.discard(mid)
            original = sent.get(mid)
            if reply.has_error() and original and reply.metadata.src_node_id != original.metadata.dst_node_id:
                # The SuperLink answers for a node it lost (e.g. "Node Unavailable"): the same error,
                # as a reply from that node, so the failure is recorded under its site.
                reply = Message(reply.error, reply_to=original)
            replies.append(reply)
            if on_reply:
                on_reply(reply)
        if pending:
            time.sleep(_POLL_SECONDS)
    return replies, [sent[m].metadata.dst_node_id for m in pending]


class _TrainingNodes:
    """A view of the grid that shows a strategy only the training sites' nodes."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid = grid
        self._ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class Coordinator:
    """State and steps of one federated run (see module docstring)."""

    def __init__(
        self, grid: Grid, cfg: Config, out_dir: Path, *, resume: bool, site_state_dir: Path | None = None
    ) -> None:
        self.grid = grid
        self.site_state_dir = site_state_dir
        self.cfg = cfg
        self.fed = cfg.federation
        self.out = out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.sites: dict[int, SiteNode] = {}
        self.strategy = with_central_dp(build_strategy(self.fed), cfg.privacy, num_sites=len(cfg.data.sites))
        n_train = len(cfg.data.sites)
        total = self.fed.rounds * (n_train + 1) + (n_train if self.fed.baselines else 0) + 1
        self.progress = ProgressWriter.in_dir(self.out)

        if resume and self.ckpt_path.is_file():
            ckpt = load_checkpoint(self.ckpt_path)
            self.run_key: str = ckpt["run_key"]
            self.round: int = ckpt["round"]
            self.initial: dict[str, np.ndarray] = ckpt["initial"]
            self.weights: dict[str, np.ndarray] = ckpt["weights"]
            self.history: dict[str, Any] = ckpt["history"]
            load_strategy_state(self.strategy, ckpt["strategy_state"])
            central = self.history.get("privacy", {}).get("central")
            if central and central.get("accountant"):
                self.strategy.accountant.load_state_dict(central["accountant"])
            self.history["run"]["resumed_at_round"].append(self.round)
            logger.info("resuming run %s after round %d from %s", self.run_key, self.round, self.ckpt_path)
        else:
            if resume:
                logger.warning("resume asked but %s does not exist: starting a new run", self.ckpt_path)
            self.run_key = f"{cfg.name}-{uuid.uuid4().hex[:8]}"
            self.round = 0
            torch.manual_seed(cfg.seed)
            nets = build_networks(
                cfg.model, channels=cfg.data.channels, image_size=cfg.data.image_size, mode=cfg.mlo.mode
            )
            self.initial = shared_weights(nets.parts(), self.fed.share)
            self.weights = {k: v.copy() for k, v in self.initial.items()}
            self.history = {
                "run": {
                    "name": cfg.name,
                    "run_key": self.run_key,
                    "started": time.time(),
                    "resumed_at_round": [],
                    "config": config_to_dict(cfg),
                },
                "sites": {},
                "rounds": [],
                "crosssite": None,
                "privacy": _privacy_header(cfg),
            }
        self.progress.start(total, desc=f"federated {cfg.mlo.mode}", done=self.round * (n_train + 1))

    # ------------------------------------------------------------------ sites
    def _message(self, node_id: int, kind: str, content: RecordDict) -> Message:
        return Message(content=content, message_type=kind, dst_node_id=node_id)

    def _config(self, **values: Any) -> ConfigRecord:
        return ConfigRecord({"run-key": self.run_key, **values})

    def identify_new_nodes(self, timeout: float = 30.0) -> None:
        """Ask nodes this run has not seen yet (new or restarted SuperNodes) which site they are."""
        unknown = [n for n in self.grid.get_node_ids() if n not in self.sites]
        if unknown:
            msgs = [
                self._message(n, MessageType.QUERY, RecordDict({"config": self._config()})) for n in unknown
            ]
            replies, _ = exchange(self.grid, msgs, timeout=timeout)
            for reply in replies:
                self._register(reply)

    def discover(self) -> None:
        """Identify connected nodes until every configured site is known or the wait times out."""
        expected = {s.name for s in (*self.cfg.data.sites, *self.cfg.data.heldout)}
        needed = self.fed.min_sites or len(self.cfg.data.sites)
        deadline = time.monotonic() + self.fed.wait_timeout
        while True:
            # Nodes answer their first message only after starting up (imports, data): be patient.
            self.identify_new_nodes(timeout=max(30.0, deadline - time.monotonic()))
            if expected <= {s.name for s in self.sites.values()} or time.monotonic() >= deadline:
                break
            time.sleep(_POLL_SECONDS)
        train = sorted(s.name for s in self.sites.values() if s.role == "train")
        missing = sorted(expected - {s.name for s in self.sites.values()})
        if len(train) < needed:
            raise FederationError(
                f"waited {self.fed.wait_timeout:.0f} s for sites: {len(train)} of {len(self.cfg.data.sites)} training "
                f"sites connected ({train}); at least {needed} required (federation.min_sites). "
                f"Missing: {missing}. Start their SuperNodes, or raise federation.wait_timeout."
            )
        if missing:
            logger.warning(
                "continuing without sites %s (not connected within %.0f s)", missing, self.fed.wait_timeout
            )

    def _register(self, reply: Message) -> None:
        node = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning("node %d could not identify itself: %s", node, _reason(reply))
            return
        site = reply.content.config_records["site"]
        counts = metrics_from_record(reply.content.metric_records["counts"])
        name = str(site["name"])
        for old, known in list(self.sites.items()):
            if known.name == name and old != node:  # a restarted SuperNode registers anew
                logger.info("site %s reconnected as node %d (was %d)", name, node, old)
                del self.sites[old]
        self.sites[node] = SiteNode(
            node, name, str(site["role"]), counts, str(site["description"]), bool(site["simulated-shift"])
        )
        self.history["sites"][name] = {
            "role": str(site["role"]),
            "n_train": int(counts["n-train"]),
            "n_val": int(counts["n-val"]),
            "n_test": int(counts["n-test"]),
            "description": str(site["description"]),
            "simulated_shift": bool(site["simulated-shift"]),
        }
        logger.info("site %s (%s) is node %d: %s", name, site["role"], node, counts)

    def _site_name(self, node_id: int) -> str:
        site = self.sites.get(node_id)
        return site.name if site else f"node-{node_id}"

    def _train_nodes(self) -> list[int]:
        return [n for n, s in self.sites.items() if s.role == "train"]

    # ------------------------------------------------------------------ rounds
    def run_round(self, rnd: int) -> None:
        started = time.perf_counter()
        record: dict[str, Any] = {
            "round": rnd,
            "train": {},
            "evaluate": {},
            "failures": [],
            "aggregated": False,
        }
        train_nodes = self._train_nodes()
        config = self._config(**{"local-iterations": self.fed.local_iterations})
        try:
            messages = list(
                self.strategy.configure_train(
                    rnd, weights_to_record(self.weights), config, _TrainingNodes(self.grid, train_nodes)
                )
            )
        except PrivacyBudgetExhausted as exc:  # client-level DP: the next release would exceed it
            record["failures"].append(
                {
                    "site": "coordinator",
                    "stage": "train",
                    "reason": f"declined: central privacy budget spent ({exc})",
                }
            )
            messages = []

        def on_reply(reply: Message) -> None:
            outcome = "failed" if reply.has_error() else "trained"
            self.progress.step(
                f"round {rnd}/{self.fed.rounds}: {self._site_name(reply.metadata.src_node_id)} {outcome}"
            )

        replies, missing = exchange(self.grid, messages, timeout=self.fed.round_timeout, on_reply=on_reply)
        accepted = []
        for reply in replies:
            name = self._site_name(reply.metadata.src_node_id)
            if self._declined(reply):
                record.setdefault("declined", {})[name] = metrics_from_record(
                    reply.content.metric_records["metrics"]
                )
                logger.info("round %d: %s declined: privacy budget spent", rnd, name)
                continue
            problem = self._screen(reply)
            if problem:
                record["failures"].append({"site": name, "stage": "train", "reason": problem})
                logger.warning("round %d: rejected the update of %s: %s", rnd, name, problem)
                continue
            accepted.append(reply)
            record["train"][name] = metrics_from_record(reply.content.metric_records["metrics"])
        for node in missing:
            name = self._site_name(node)
            record["failures"].append(
                {"site": name, "stage": "train", "reason": f"no reply within {self.fed.round_timeout:.0f} s"}
            )
            self.progress.step(f"round {rnd}: {name} did not reply")
        needed = self.fed.min_sites or 1
        if len(accepted) >= needed:
            arrays, _ = self.strategy.aggregate_train(rnd, accepted)
            if arrays is not None:
                new = record_to_weights(arrays)
                record["update_norm"] = float(
                    np.sqrt(sum(float(np.sum((new[k] - self.weights[k]) ** 2)) for k in new))
                )
                self.weights = new
                record["aggregated"] = True
        if not record["aggregated"]:
            logger.error(
                "round %d: %d valid updates, %d needed: the global model is unchanged",
                rnd,
                len(accepted),
                needed,
            )
        record["evaluate"] = self.evaluate(
            {"global": self.weights}, rnd, record["failures"], personalize=True
        )
        self.progress.step(f"round {rnd}/{self.fed.rounds}: evaluated")
        record["seconds"] = time.perf_counter() - started
        self._record_privacy(record)
        self.history["rounds"].append(record)
        self.history["crosssite"] = None  # computed again for the final model
        self.round = rnd
        self.save()
        dice = {
            k: round(v.get("global", {}).get("dice", float("nan")), 3) for k, v in record["evaluate"].items()
        }
        logger.info("round %d/%d done in %.0f s; test Dice %s", rnd, self.fed.rounds, record["seconds"], dice)

    def _declined(self, reply: Message) -> bool:
        """A site that declines (privacy budget spent) replies with metrics only, flagged ``declined``."""
        if reply.has_error() or reply.content.array_records or reply.content.config_records:
            return False
        records = reply.content.metric_records
        return set(records) == {"metrics"} and is_declined(metrics_from_record(records["metrics"]))

    def _record_privacy(self, record: dict[str, Any]) -> None:
        """Each site's ``dp-*`` numbers of this round (trained or declined) into ``history["privacy"]``."""
        privacy = self.history.setdefault("privacy", _privacy_header(self.cfg))
        rnd = record["round"]
        declined = record.get("declined", {})
        for name, metrics in [*record["train"].items(), *declined.items()]:
            values = {k[len(METRIC_PREFIX) :]: v for k, v in metrics.items() if k.startswith(METRIC_PREFIX)}
            if not values:
                continue
            site = privacy["sites"].setdefault(name, {"rounds": []})
            site["epsilon_target"] = values.get("epsilon-target")
            site["delta"] = values.get("delta")
            status = "declined: privacy budget spent" if name in declined else "trained"
            site["rounds"] = [r for r in site["rounds"] if r["round"] != rnd]
            site["rounds"].append({"round": rnd, "status": status, **values})
        central = central_state(self.strategy)
        if central is not None:
            rounds = [r for r in privacy["central"].get("rounds", []) if r["round"] != rnd]
            rounds.append({"round": rnd, "epsilon": central["epsilon"], "aggregated": record["aggregated"]})
            privacy["central"] = {**central, "rounds": rounds}

    def _screen(self, reply: Message) -> str | None:
        if reply.has_error():
            return _reason(reply)
        content = reply.content
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            return "reply lacks the 'arrays' or 'metrics' record"
        if len(content.array_records) != 1 or content.config_records:
            return "reply carries records other than the shared weights and metrics"
        return check_update(record_to_weights(content.array_records["arrays"]), self.weights)

    def evaluate(
        self,
        models: Mapping[str, Mapping[str, np.ndarray]],
        rnd: int,
        failures: list[dict[str, str]],
        *,
        personalize: bool,
    ) -> dict[str, dict[str, dict[str, float]]]:
        """Every site's test metrics for each model: {site: {model: {dice, iou, hd95, n}}}."""
        content = RecordDict(
            {f"{MODEL_PREFIX}{name}": weights_to_record(split_and_prefix(w)) for name, w in models.items()}
        )
        content["config"] = self._config(**{"server-round": rnd, "personalize": personalize})
        messages = [self._message(n, MessageType.EVALUATE, content) for n in self.sites]
        replies, missing = exchange(self.grid, messages, timeout=self.fed.round_timeout)
        results: dict[str, dict[str, dict[str, float]]] = {}
        for reply in replies:
            name = self._site_name(reply.metadata.src_node_id)
            if reply.has_error():
                failures.append({"site": name, "stage": "evaluate", "reason": _reason(reply)})
                continue
            results[name] = nested_metrics_from_record(reply.content.metric_records["metrics"])
        for node in missing:
            failures.append(
                {"site": self._site_name(node), "stage": "evaluate", "reason": "no reply in time"}
            )
        return results

    # ------------------------------------------------------------------ cross-site
    def crosssite(self) -> None:
        """Local-only / fine-tuned baselines at each training site, then every model on every site."""
        failures: list[dict[str, str]] = []
        models: dict[str, dict[str, np.ndarray]] = {"global": self.weights}
        if self.fed.baselines:
            config = self._config(
                iterations=self.fed.rounds * self.fed.local_iterations,
                **{"finetune-iterations": self.fed.finetune_iterations},
            )
            content = RecordDict(
                {
                    "initial": weights_to_record(self.initial),
                    "global": weights_to_record(self.weights),
                    "config": config,
                }
            )
            messages = [
                self._message(n, f"{MessageType.TRAIN}.{BASELINE_ACTION}", content)
                for n in self._train_nodes()
            ]

            def on_reply(reply: Message) -> None:
                self.progress.step(f"baselines: {self._site_name(reply.metadata.src_node_id)}")

            timeout = self.fed.round_timeout * max(1, self.fed.rounds)
            replies, missing = exchange(self.grid, messages, timeout=timeout, on_reply=on_reply)
            for reply in replies:
                name = self._site_name(reply.metadata.src_node_id)
                if reply.has_error():
                    failures.append({"site": name, "stage": "baseline", "reason": _reason(reply)})
                    continue
                if self._declined(reply):
                    failures.append(
                        {
                            "site": name,
                            "stage": "baseline",
                            "reason": "declined: not covered by its privacy budget",
                        }
                    )
                    continue
                for kind, record in reply.content.array_records.items():
                    models[f"{kind}:{name}"] = record_to_weights(record)
                if "metrics" in reply.content.metric_records:  # timings of the local-only training
                    self.history.setdefault("baselines", {})[name] = metrics_from_record(
                        reply.content.metric_records["metrics"]
                    )
            failures += [
                {"site": self._site_name(n), "stage": "baseline", "reason": "no reply"} for n in missing
            ]
        order = [s.name for s in self.cfg.data.sites]
        rank = {
            f"{kind}:{site}": (k, i)
            for k, kind in enumerate(("local", "finetuned"))
            for i, site in enumerate(order)
        }
        models = {
            "global": models.pop("global"),
            **dict(sorted(models.items(), key=lambda kv: rank.get(kv[0], (9, 0)))),
        }
        results = self.evaluate(models, self.round, failures, personalize=False)
        self.progress.step("cross-site evaluation")
        sites = [s.name for s in self.cfg.data.sites] + [s.name for s in self.cfg.data.heldout]
        names = list(models)
        matrix = {
            metric: [[results.get(site, {}).get(m, {}).get(metric) for site in sites] for m in names]
            for metric in ("dice", "iou", "hd95")
        }
        self.history["crosssite"] = {
            "models": names,
            "sites": sites,
            "heldout": [s.name for s in self.cfg.data.heldout],
            **matrix,
            "failures": failures,
        }

    # ------------------------------------------------------------------ persistence
    def save(self) -> None:
        save_checkpoint(
            {
                "run_key": self.run_key,
                "round": self.round,
                "initial": self.initial,
                "weights": self.weights,
                "strategy_state": strategy_state(self.strategy),
                "history": self.history,
            },
            self.ckpt_path,
        )
        write_json_atomic(self.history, self.out / "metrics.json")

    def finish(self) -> Path:
        self.history["run"]["finished"] = time.time()
        self.history["run"]["seconds"] = self.history["run"]["finished"] - self.history["run"]["started"]
        self.save()
        for part in self.fed.share:
            state = {k: torch.as_tensor(v) for k, v in split_part(self.weights, part).items()}
            if state:
                torch.save(state, self.out / f"global_{part}.pt")
        sample_dirs = {
            name: str(p) for name in self.history["sites"] if (p := self._sample_path(name)) is not None
        }
        self.history["samples"] = sample_dirs
        write_json_atomic(self.history, self.out / "metrics.json")
        report = write_report(self.history, self.out)
        self.progress.done()
        return report

    def _sample_path(self, site: str) -> Path | None:
        # Written on site; visible here only when the sites share this machine (simulation).
        if self.site_state_dir is None:
            return None
        path = self.site_state_dir / _safe(self.run_key) / _safe(site) / "samples.png"
        return path if path.is_file() else None


def _privacy_header(cfg: Config) -> dict[str, Any]:
    """What ``history["privacy"]`` holds before any round: the modes and each site's target."""
    p = cfg.privacy
    return {
        "sample_level": p.enabled,
        "central_mode": p.central,
        "targets": {
            s.name: dict(zip(("epsilon", "delta"), p.budget(s.name), strict=True)) for s in cfg.data.sites
        },
        "sites": {},
        "central": {},
    }


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def split_and_prefix(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Only the segmenter's entries (evaluation needs nothing else), keys unchanged."""
    return {k: v for k, v in weights.items() if k.startswith("segmenter/")}


def run_federation(
    grid: Grid, cfg: Config, out_dir: Path, *, resume: bool = False, site_state_dir: Path | None = None
) -> Path:
    """Run (or resume) the whole federated experiment; returns the path of ``report.md``.

    ``site_state_dir`` is where simulated sites keep their on-site state; only used to link their
    sample images in the report (in deployment the images stay at the hospitals).
    """
    coord = Coordinator(grid, cfg, out_dir, resume=resume, site_state_dir=site_state_dir)
    coord.discover()
    for rnd in range(coord.round + 1, cfg.federation.rounds + 1):
        if rnd > coord.round + 1:
            coord.identify_new_nodes()
        coord.run_round(rnd)
    if coord.history["crosssite"] is None:
        coord.crosssite()
    return coord.finish()
