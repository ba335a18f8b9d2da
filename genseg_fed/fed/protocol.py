"""The messages coordinator and sites exchange, as Flower records.

=====================  ============================================  ==========================================
message type           coordinator sends                             site replies
=====================  ============================================  ==========================================
``query``              config: run-key                               config: name, role, description,
                                                                     simulated-shift; metrics: counts
``train``              arrays: global weights; config: server-round, arrays: updated shared weights;
                       local-iterations, run-key[, proximal-mu]      metrics: num-examples, losses, seconds,
                                                                     cpu_seconds, train_seconds,
                                                                     train_cpu_seconds
``train.baseline``     arrays ``initial`` and ``global``; config:    arrays ``local`` [and ``finetuned``]
                       iterations, finetune-iterations, run-key      (segmenter weights); metrics:
                                                                     train_seconds, train_cpu_seconds
``evaluate``           one ``model:<name>`` array record per model;  metrics ``<name>|dice`` ... and
                       config: server-round, run-key, personalize    num-examples
=====================  ============================================  ==========================================

Shared weights are ``fed.weights`` mappings; nothing else with a shape ever goes back.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord

__all__ = [
    "BASELINE_ACTION",
    "MODEL_PREFIX",
    "metrics_from_record",
    "metrics_to_record",
    "nested_metrics_from_record",
    "nested_metrics_to_record",
    "record_to_weights",
    "weights_to_record",
]

BASELINE_ACTION = "baseline"  # train.baseline
MODEL_PREFIX = "model:"
_SEP = "|"


def weights_to_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Shared weights -> ArrayRecord (keys kept, float32)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in weights.items()})


def record_to_weights(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> shared weights."""
    return {k: a.numpy() for k, a in record.items()}


def metrics_to_record(metrics: Mapping[str, float]) -> MetricRecord:
    """Scalar metrics -> MetricRecord (non-finite values are dropped: Flower records hold numbers)."""
    return MetricRecord({k: float(v) for k, v in metrics.items() if np.isfinite(v)})


def metrics_from_record(record: MetricRecord) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()}


def nested_metrics_to_record(metrics: Mapping[str, Mapping[str, float]], **extra: float) -> MetricRecord:
    """``{"global": {"dice": .8}}`` -> MetricRecord ``{"global|dice": .8, **extra}``."""
    flat = {f"{outer}{_SEP}{inner}": v for outer, d in metrics.items() for inner, v in d.items()}
    return metrics_to_record({**flat, **extra})


def nested_metrics_from_record(record: MetricRecord) -> dict[str, dict[str, float]]:
    """Inverse of :func:`nested_metrics_to_record` (keys without the separator are skipped)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in record.items():
        if _SEP in key:
            outer, inner = key.rsplit(_SEP, 1)
            out.setdefault(outer, {})[inner] = float(value)
    return out
