"""Pretext losses: SimCLR's NT-Xent and BYOL's normalised regression, as spec §2.3 defines them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# the official code writes this into the diagonal of the logits to exclude self-similarity (spec §6.3)
SELF_SIMILARITY_MASK = -1e9


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent over the 2N embeddings [z1; z2], averaged over all 2N anchors.

    z is L2-normalised and divided by √τ, so that z·zᵀ holds the cosine similarities over τ; the
    diagonal is masked; the target of anchor i is its partner i ± N. Distributed training gathers the
    embeddings of all ranks before calling this (issue 7), so the formula is that of the global batch.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must be (N, D) of equal shape; got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1) / temperature ** 0.5
    logits = z @ z.T
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), SELF_SIMILARITY_MASK)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """Symmetrised BYOL loss: predictions of view 1 regress the target projection of view 2 and vice
    versa; each term is 2 − 2·cos, averaged over the batch. Targets must come without gradient."""
    def term(p, t):
        return (2 - 2 * F.cosine_similarity(p, t.detach(), dim=1)).mean()
    return term(p1, t2) + term(p2, t1)
