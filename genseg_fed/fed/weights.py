"""Which weights cross the wire, and checks on what comes back.

Shared weights are a flat ``{"segmenter/<param>": array, "generator/<param>": array}`` mapping of
float32 NumPy arrays. The discriminator, optimiser states and anything computed from the
validation split never appear in it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..models import norm_parameter_names

__all__ = ["SHAREABLE", "check_update", "load_shared_weights", "shared_weights", "split_part"]

SHAREABLE = ("segmenter", "generator")  # the discriminator never leaves the site


def shared_weights(parts: Mapping[str, nn.Module], share: Iterable[str]) -> dict[str, np.ndarray]:
    """Flat copy of the state of the shared networks (``share`` is a subset of :data:`SHAREABLE`)."""
    out: dict[str, np.ndarray] = {}
    for part in share:
        if part not in SHAREABLE:
            raise ValueError(f"'{part}' may not be shared; choose from {list(SHAREABLE)}")
        if part not in parts:
            continue  # e.g. no generator in seg-only mode
        for name, tensor in parts[part].state_dict().items():
            out[f"{part}/{name}"] = tensor.detach().cpu().numpy().astype(np.float32, copy=True)
    return out


def split_part(weights: Mapping[str, np.ndarray], part: str) -> dict[str, np.ndarray]:
    """The entries of one network, with the ``<part>/`` prefix removed."""
    prefix = f"{part}/"
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def load_shared_weights(
    parts: Mapping[str, nn.Module], weights: Mapping[str, np.ndarray], *, keep_local_norms: bool = False
) -> list[str]:
    """Copy received weights into the networks; returns the names it kept local.

    Args:
        keep_local_norms: FedBN-style personalisation: normalisation-layer parameters keep their
            on-site values instead of the received ones.
    """
    kept: list[str] = []
    for part, net in parts.items():
        received = split_part(weights, part)
        if not received:
            continue
        norms = norm_parameter_names(net) if keep_local_norms else set()
        state = net.state_dict()
        unknown = sorted(set(received) - set(state))
        if unknown:
            raise ValueError(f"received {part} weights that this network does not have: {unknown[:5]}")
        for name, array in received.items():
            if name in norms:
                kept.append(f"{part}/{name}")
                continue
            state[name] = torch.as_tensor(array, dtype=state[name].dtype).reshape(state[name].shape)
        net.load_state_dict(state)
    return kept


def check_update(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> str | None:
    """Why an update must be rejected (missing/extra keys, wrong shapes, NaN/Inf), or None if it is fine."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"wrong keys: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
    for name, ref in reference.items():
        arr = update[name]
        if tuple(arr.shape) != tuple(ref.shape):
            return f"wrong shape for {name}: {tuple(arr.shape)}, expected {tuple(ref.shape)}"
        if not np.issubdtype(arr.dtype, np.floating):
            return f"wrong dtype for {name}: {arr.dtype}"
        if not np.isfinite(arr).all():
            return f"non-finite values (NaN/Inf) in {name}"
    return None
