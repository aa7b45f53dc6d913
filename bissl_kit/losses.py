"""Pretext losses (SimCLR's NT-Xent and BYOL's normalised regression, as spec §2.3 defines them) and the
downstream classification loss, single- or multi-label (:func:`downstream_loss`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import distributed

# the official code writes this into the diagonal of the logits to exclude self-similarity (spec §6.3)
SELF_SIMILARITY_MASK = -1e9


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *,
            gather: bool | None = None) -> torch.Tensor:
    """NT-Xent over the 2N embeddings [z1; z2], averaged over all 2N anchors.

    z is L2-normalised and divided by √τ, so that z·zᵀ holds the cosine similarities over τ; the
    diagonal is masked; the target of anchor i is its partner i ± N.

    Under torchrun (``gather=None`` follows :func:`bissl_kit.distributed.is_distributed`) z1, z2 are
    this rank's shard of the global batch: the embeddings of all ranks are gathered into the global
    [all z1; all z2] (a gather that is differentiable twice, for the Hessian of BiSSL), and the
    result is the mean, over this rank's 2n anchors, of their loss against all 2N candidates. The
    mean of these over the ranks is the single-process loss of the global batch, and the mean of
    their gradients its gradient (the convention of bissl_kit.distributed).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must be (N, D) of equal shape; got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if gather is None:
        gather = distributed.is_distributed()
    if gather:
        return _nt_xent_gathered(z1, z2, temperature)
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1) / temperature ** 0.5
    logits = z @ z.T
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), SELF_SIMILARITY_MASK)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def _nt_xent_gathered(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    w, r, n = distributed.world_size(), distributed.rank(), z1.shape[0]
    big_n = w * n
    local = F.normalize(torch.cat([z1, z2]), dim=1) / temperature ** 0.5       # (2n, D): rank r's rows
    every = distributed.gather_cat(local)                                       # (W·2n, D), rank-major
    every = every.view(w, 2, n, -1).transpose(0, 1).reshape(2 * big_n, -1)    # [all z1; all z2]
    rows = torch.arange(n, device=z1.device) + r * n
    anchors = torch.cat([rows, rows + big_n])                                    # global positions of `local`
    logits = local @ every.T                                                     # (2n, 2N)
    logits = logits.masked_fill(F.one_hot(anchors, 2 * big_n).bool(), SELF_SIMILARITY_MASK)
    return F.cross_entropy(logits, (anchors + big_n) % (2 * big_n))


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """Symmetrised BYOL loss: predictions of view 1 regress the target projection of view 2 and vice
    versa; each term is 2 − 2·cos, averaged over the batch. Targets must come without gradient."""
    def term(p, t):
        return (2 - 2 * F.cosine_similarity(p, t.detach(), dim=1)).mean()
    return term(p1, t2) + term(p2, t1)


# ---- the downstream loss -------------------------------------------------------------------------------

# how a multi-label task (targets: float N×C multi-hot) is trained. 'softmax_ce' is the official code's
# nn.CrossEntropyLoss fed the multi-hot vector (spec §1.3, C15): −Σ_c t_c log softmax(z)_c per image, a softmax
# over classes that compete although several are true; 'bce' is the usual multi-label loss, one independent
# sigmoid per class (nn.BCEWithLogitsLoss, mean over images and classes).
MULTILABEL_LOSSES = ("softmax_ce", "bce")


def downstream_loss(logits: torch.Tensor, targets: torch.Tensor, multilabel_loss: str = "softmax_ce", *,
                    reduction: str = "mean") -> torch.Tensor:
    """The downstream (classification) loss of every stage: cross-entropy for class-index targets (int N), and
    for multi-hot targets (float N×C) the ``multilabel_loss`` of :data:`MULTILABEL_LOSSES`. ``reduction``
    'mean' averages over images (and, for 'bce', classes), 'sum' adds them up."""
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets, reduction=reduction)
    targets = targets.to(logits.dtype)
    if multilabel_loss == "softmax_ce":
        return F.cross_entropy(logits, targets, reduction=reduction)  # soft targets: exactly the official call
    if multilabel_loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction=reduction)
    raise ValueError(f"multilabel_loss={multilabel_loss!r} must be one of {', '.join(map(repr, MULTILABEL_LOSSES))}")
