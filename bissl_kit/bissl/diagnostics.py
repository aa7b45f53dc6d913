"""What the BiSSL stage measures besides its losses: cosines of gradients, per layer, and norms."""

from __future__ import annotations

import math

def _flat_norm(ts) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts))


def cosine(a, b) -> float:
    """Cosine similarity of two tuples of tensors as concatenated vectors (nan if either is 0)."""
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    na, nb = _flat_norm(a), _flat_norm(b)
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")


def layer_groups(names: list[str]) -> list[tuple[str, list[int]]]:
    """Parameter indices grouped by layer: 'conv1'/'bn1' → 'stem', 'layer2.1.conv1.weight' → 'layer2.1'."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        parts = n.split(".")
        key = ".".join(parts[:2]) if parts[0].startswith("layer") else ("stem" if parts[0] in ("conv1", "bn1") else parts[0])
        groups.setdefault(key, []).append(i)
    return list(groups.items())
