"""Flower ClientApp: one hospital. Decodes messages, calls the site session, encodes replies.

All training and evaluation logic lives in :mod:`genseg_fed.fed.site`; replies carry only the
shared weights and scalar metrics (see :mod:`genseg_fed.fed.protocol`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from genseg_fed.fed.packing import packing_mod
from genseg_fed.fed.protocol import (
    BASELINE_ACTION,
    MODEL_PREFIX,
    metrics_to_record,
    nested_metrics_to_record,
    record_to_weights,
    weights_to_record,
)
from genseg_fed.fed.runconfig import experiment_config, site_for_node, site_state_dir
from genseg_fed.fed.site import SiteSession
from genseg_fed.privacy import BudgetSpent
from genseg_fed.privacy.central import central_clipping_mod
from genseg_fed.privacy.site import declined_metrics

logger = logging.getLogger(__name__)

app = ClientApp(mods=[packing_mod])  # weights travel as one flat array per record (fed/packing.py)


def _session(msg: Message, context: Context) -> SiteSession:
    cfg = experiment_config(context.run_config)
    site = site_for_node(cfg, context.node_config)
    run_key = str(msg.content.config_records["config"]["run-key"])
    state_dir = site_state_dir(context.run_config, context.node_config)
    # A hospital may set its own privacy budget: --node-config 'epsilon=3.0 delta=1e-6'.
    node = context.node_config
    return SiteSession(
        cfg,
        site.spec,
        site.role,
        state_dir,
        run_key=run_key,
        epsilon=float(node["epsilon"]) if "epsilon" in node else None,
        delta=float(node["delta"]) if "delta" in node else None,
    )


def _declined(msg: Message, exc: BudgetSpent) -> Message:
    """No weights: only the privacy numbers and ``declined = 1`` (see genseg_fed.privacy.site)."""
    logger.info("%s", exc)
    return Message(RecordDict({"metrics": metrics_to_record(declined_metrics(exc.report))}), reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Name, role (train / held-out) and image counts of this site."""
    ident = asdict(_session(msg, context).identity())
    site = ConfigRecord(
        {
            "name": ident["name"],
            "role": ident["role"],
            "description": ident["description"],
            "simulated-shift": ident["simulated_shift"],
        }
    )
    counts = MetricRecord({"n-train": ident["n_train"], "n-val": ident["n_val"], "n-test": ident["n_test"]})
    return Message(RecordDict({"site": site, "counts": counts}), reply_to=msg)


@app.train(mods=[central_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """One federated round of local GenSeg training (or a decline once the privacy budget is spent)."""
    config = msg.content.config_records["config"]
    try:
        weights, metrics = _session(msg, context).train_round(
            record_to_weights(msg.content.array_records["arrays"]),
            server_round=int(config["server-round"]),
            iterations=int(config["local-iterations"]),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
        )
    except BudgetSpent as exc:
        return _declined(msg, exc)
    content = RecordDict({"arrays": weights_to_record(weights), "metrics": metrics_to_record(metrics)})
    return Message(content, reply_to=msg)


@app.train(BASELINE_ACTION)
def train_baselines(msg: Message, context: Context) -> Message:
    """Local-only (and fine-tuned) segmenters for the cross-site comparison."""
    config = msg.content.config_records["config"]
    try:
        models, metrics = _session(msg, context).baselines(
            record_to_weights(msg.content.array_records["initial"]),
            record_to_weights(msg.content.array_records["global"]),
            iterations=int(config["iterations"]),
            finetune_iterations=int(config["finetune-iterations"]),
        )
    except BudgetSpent as exc:
        return _declined(msg, exc)
    content = RecordDict({kind: weights_to_record(w) for kind, w in models.items()})
    content["metrics"] = metrics_to_record(metrics)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Test metrics of every model in the message on this site's test images."""
    config = msg.content.config_records["config"]
    models = {
        key[len(MODEL_PREFIX) :]: record_to_weights(record)
        for key, record in msg.content.array_records.items()
        if key.startswith(MODEL_PREFIX)
    }
    session = _session(msg, context)
    results = session.evaluate(
        models,
        personalize=bool(config.get("personalize", False)),
        server_round=int(config.get("server-round", 0)),
    )
    record = nested_metrics_to_record(results, **{"num-examples": float(len(session.split.test))})
    return Message(RecordDict({"metrics": record}), reply_to=msg)


__all__ = ["ArrayRecord", "app"]
