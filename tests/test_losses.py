"""NT-Xent and BYOL losses against direct per-anchor formulas (float64)."""
import math

import torch
import torch.nn.functional as F

from bissl_kit.losses import byol_loss, nt_xent


def nt_xent_per_anchor(z1, z2, tau):
    """Spec §2.3 written out anchor by anchor: -log( exp(s_ip/τ) / Σ_{k≠i} exp(s_ik/τ) )."""
    z = torch.cat([z1, z2])
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        partner = (i + n2 // 2) % n2
        sims = [F.cosine_similarity(z[i], z[k], dim=0).item() / tau for k in range(n2)]
        denom = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        total += -(sims[partner] - math.log(denom))
    return total / n2


def test_nt_xent_matches_per_anchor_formula():
    g = torch.Generator().manual_seed(0)
    for n, d, tau in [(4, 3, 0.5), (7, 16, 0.1), (2, 5, 1.0)]:
        z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
        z2 = torch.randn(n, d, generator=g, dtype=torch.float64)
        assert abs(nt_xent(z1, z2, tau).item() - nt_xent_per_anchor(z1, z2, tau)) < 1e-12


def test_nt_xent_is_low_for_identical_views_and_scale_invariant():
    z = torch.randn(8, 32, dtype=torch.float64)
    same = nt_xent(z, z, 0.1).item()
    other = nt_xent(z, torch.randn(8, 32, dtype=torch.float64), 0.1).item()
    assert same < other
    assert abs(nt_xent(3 * z, z, 0.1).item() - same) < 1e-12  # embeddings are L2-normalised


def test_nt_xent_rejects_bad_input():
    import pytest
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(2, 3), torch.randn(2, 3), 0.0)
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent(torch.randn(2, 3), torch.randn(3, 3), 0.5)


def test_byol_loss_formula_and_target_gets_no_gradient():
    g = torch.Generator().manual_seed(1)
    p1, p2, t1, t2 = (torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    expected = sum((2 - 2 * (p[i] @ t[i]) / (p[i].norm() * t[i].norm())).item()
                   for p, t in ((p1, t2), (p2, t1)) for i in range(5)) / 5
    loss = byol_loss(p1, p2, t1, t2)
    assert abs(loss.item() - expected) < 1e-12
    loss.backward()
    assert t1.grad is None and t2.grad is None and p1.grad is not None
    # a perfect prediction gives zero loss
    assert byol_loss(t2, t1, t1, t2).item() < 1e-12


# ---- the pretext methods on a BatchNorm network: one forward per view, as the official code ---------------

def _bn_models():
    import copy

    from bissl_kit.models import build_backbone
    from bissl_kit.pretext import build_pretext
    torch.manual_seed(0)
    backbone = build_backbone(width=4, in_channels=1, small_stem=True).double()
    g = torch.Generator().manual_seed(1)
    v1 = torch.rand(6, 1, 12, 12, generator=g, dtype=torch.float64)
    v2 = torch.rand(6, 1, 12, 12, generator=g, dtype=torch.float64)
    models = {m: build_pretext(m, copy.deepcopy(backbone), proj_hidden=8, proj_dim=8, pretext_forward="per_view").double()
              for m in ("simclr", "byol")}
    return models, v1, v2


def _buffers(m):
    return torch.cat([b.double().reshape(-1) for b in m.buffers()])


def test_per_view_simclr_is_two_forwards_and_joint_is_not():
    import copy
    models, v1, v2 = _bn_models()
    ours, ref, joint = models["simclr"], copy.deepcopy(models["simclr"]), copy.deepcopy(models["simclr"])
    loss = ours.loss(v1, v2)
    # the reference: each view through backbone and projector on its own (spec §2.3), then NT-Xent
    z1, z2 = ref.head(ref.backbone(v1)), ref.head(ref.backbone(v2))
    expected = nt_xent(z1, z2, ref.temperature)
    assert abs(loss.item() - expected.item()) < 1e-12
    assert torch.equal(_buffers(ours), _buffers(ref))  # BN buffers updated twice, as by two forwards
    assert all(b == 2 for n, b in ours.named_buffers() if n.endswith("num_batches_tracked"))
    joint.pretext_forward = "joint"
    assert abs(joint.loss(v1, v2).item() - expected.item()) > 1e-4  # one forward mixes the views' statistics
    assert all(b == 1 for n, b in joint.named_buffers() if n.endswith("num_batches_tracked"))


def test_per_view_byol_is_two_forwards_of_each_network():
    import copy
    models, v1, v2 = _bn_models()
    ours, ref = models["byol"], copy.deepcopy(models["byol"])
    loss = ours.loss(v1, v2)
    online = [ref.head["predictor"](ref.head["projector"](ref.backbone(v))) for v in (v1, v2)]
    with torch.no_grad():
        target = [ref.target["projector"](ref.target["backbone"](v)) for v in (v1, v2)]
    assert abs(loss.item() - byol_loss(online[0], online[1], target[0], target[1]).item()) < 1e-12
    assert torch.equal(_buffers(ours), _buffers(ref))
