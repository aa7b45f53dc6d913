"""Weighted k-NN against hand-computed cases; the linear probe; BN statistics of frozen features."""
import math

import pytest
import torch
from torch import nn

from bissl_kit.augment import normalize
from bissl_kit.evaluate import (
    estimate_bn_stats,
    extract_features,
    knn_accuracy,
    knn_predict,
)


def test_weighted_vote_by_hand():
    # train points on the unit circle; the query at angle 0
    angles = torch.tensor([0.1, 0.2, 1.5, 3.0])
    train = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.tensor([0, 1, 1, 0])
    q = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(train, labels, q, k=3, temperature=0.5, num_classes=2)
    w = [math.exp(math.cos(a) / 0.5) for a in (0.1, 0.2, 1.5)]
    assert scores[0, 0].item() == pytest.approx(w[0])
    assert scores[0, 1].item() == pytest.approx(w[1] + w[2])
    # with k = 3 the two class-1 neighbours outvote the nearest (class 0) one
    assert knn_accuracy(train, labels, q, torch.tensor([1]), k=3, temperature=0.5).accuracy == 1.0
    # with k = 1 the nearest one decides
    assert knn_accuracy(train, labels, q, torch.tensor([1]), k=1, temperature=0.5).accuracy == 0.0


def test_protocol_is_reported_and_k_is_capped():
    res = knn_accuracy(torch.eye(3), torch.tensor([0, 1, 2]), torch.eye(3), torch.tensor([0, 1, 2]),
                       k=50, temperature=0.07)
    assert res.accuracy == 1.0 and res.k == 3
    assert "k=3" in res.protocol() and "T=0.07" in res.protocol()
    with pytest.raises(ValueError, match="k=0"):
        knn_predict(torch.eye(3), torch.tensor([0, 1, 2]), torch.eye(3), k=0, temperature=1.0, num_classes=3)


# ---- linear probe ---------------------------------------------------------------------------------------

def _blobs(n_per_class: int, seed: int, *, noise_dims: int = 0, noise_scale: float = 1.0):
    """Three classes told apart by the first two dimensions only (centres 3 apart, unit spread);
    ``noise_dims`` more dimensions of pure noise with standard deviation ``noise_scale``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    y = torch.arange(3).repeat_interleave(n_per_class)
    x = centres[y] + 0.5 * torch.randn(len(y), 2, generator=g)
    if noise_dims:
        x = torch.cat([x, noise_scale * torch.randn(len(y), noise_dims, generator=g)], 1)
    return x, y


def test_probe_matches_the_exact_regularised_logistic_regression():
    """Full-batch, strongly convex: the SGD probe must land on sklearn's L-BFGS optimum of the same
    objective (mean CE + wd/2 ‖W‖², bias free), i.e. the written-out gradient is the true one."""
    from sklearn.linear_model import LogisticRegression

    from bissl_kit.evaluate import _fit_probe

    x, y = _blobs(20, seed=1)
    wd = 0.05
    w, b, mean, std = _fit_probe(x, y, 3, epochs=400, lr=0.5, weight_decay=wd, batch_size=len(x), seed=0)
    xs = ((x.double() - mean) / std).numpy()
    ref = LogisticRegression(C=1.0 / (wd * len(x)), tol=1e-12, max_iter=10_000).fit(xs, y.numpy())
    ours = torch.softmax(torch.from_numpy(xs) @ w + b, 1).numpy()
    assert abs(ours - ref.predict_proba(xs)).max() < 1e-4


def test_probe_reads_a_low_variance_direction_that_knn_misses():
    """The label lives in 2 dimensions of spread ~1; 30 more dimensions of spread 20 are noise. Cosine
    k-NN is swamped by the noise; the standardised probe learns to ignore it."""
    from bissl_kit.evaluate import linear_probe

    xt, yt = _blobs(100, seed=2, noise_dims=30, noise_scale=20.0)
    xe, ye = _blobs(50, seed=3, noise_dims=30, noise_scale=20.0)
    probe = linear_probe(xt, yt, xe, ye, epochs=50, lr=0.1, weight_decay=1e-3, batch_size=64)
    knn = knn_accuracy(xt, yt, xe, ye, k=20, temperature=0.07)
    assert probe.accuracy > 0.9 and probe.train_accuracy > 0.9
    assert knn.accuracy < 0.6


def test_probe_is_deterministic_and_invariant_to_feature_scale():
    from bissl_kit.evaluate import linear_probe

    xt, yt = _blobs(30, seed=4, noise_dims=5)
    xe, ye = _blobs(30, seed=5, noise_dims=5)
    a = linear_probe(xt, yt, xe, ye, epochs=5, batch_size=16, seed=7)
    assert linear_probe(xt, yt, xe, ye, epochs=5, batch_size=16, seed=7) == a
    scale = torch.logspace(-3, 3, xt.shape[1])  # per-dimension units must not matter after standardising
    assert linear_probe(xt * scale, yt, xe * scale, ye, epochs=5, batch_size=16, seed=7).accuracy == a.accuracy
    # the seed orders the batches, so another seed takes other steps (here: other train probabilities)
    from bissl_kit.evaluate import _fit_probe
    w7 = _fit_probe(xt, yt, 3, epochs=2, lr=0.1, weight_decay=0.0, batch_size=16, seed=7)[0]
    w8 = _fit_probe(xt, yt, 3, epochs=2, lr=0.1, weight_decay=0.0, batch_size=16, seed=8)[0]
    assert not torch.equal(w7, w8)


def test_probe_protocol_and_argument_errors():
    from bissl_kit.evaluate import linear_probe

    xt, yt = _blobs(10, seed=6)
    res = linear_probe(xt, yt, xt[:7], yt[:7], epochs=3, lr=0.2, weight_decay=1e-4, batch_size=8)
    text = res.protocol()
    for part in ("linear probe", "3 epochs", "batch 8", "lr 0.2", "wd 0.0001", "30 train → 7 eval"):
        assert part in text, (part, text)
    with pytest.raises(ValueError, match="epochs=0"):
        linear_probe(xt, yt, xt, yt, epochs=0)
    with pytest.raises(ValueError, match="lr=-1"):
        linear_probe(xt, yt, xt, yt, lr=-1)
    with pytest.raises(ValueError, match="same D"):
        linear_probe(xt, yt, xt[:, :1], yt)


# ---- BN statistics of frozen features ("precise BN") ------------------------------------------------

def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_estimate_bn_stats_is_the_images_statistics_on_a_copy():
    net = _bn_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = (torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    est = estimate_bn_stats(net, x, mean=(0.5,), std=(0.5,), batch_size=64)
    z = net[0](normalize(x, (0.5,), (0.5,)))
    torch.testing.assert_close(est[1].running_mean, z.mean((0, 2, 3)))
    torch.testing.assert_close(est[1].running_var, z.var((0, 2, 3), unbiased=True))
    assert not est.training and est[1].momentum == 0.1  # update_bn restores the layers' momentum
    # the original: same parameters and buffers, still in train mode, its BN momentum kept
    assert net.training and net[1].momentum == 0.1
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # equal batches: the running mean is still the exact mean over all images
    est2 = estimate_bn_stats(net, x, mean=(0.5,), std=(0.5,), batch_size=10)
    torch.testing.assert_close(est2[1].running_mean, z.mean((0, 2, 3)))
    # and the features then use them: eval-mode features of the copy differ from the identity-BN net's
    f_as_held = extract_features(net, x, mean=(0.5,), std=(0.5,))
    f_est = extract_features(est, x, mean=(0.5,), std=(0.5,))
    assert f_as_held.shape == f_est.shape == (40, 3) and not torch.allclose(f_as_held, f_est)


def test_estimate_bn_stats_makes_synchronised_bn_local_on_the_copy_only():
    from bissl_kit.distributed import SyncBatchNorm, convert_sync_batchnorm
    net = convert_sync_batchnorm(_bn_net())
    x = (torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    est = estimate_bn_stats(net, x, mean=(0.5,), std=(0.5,))
    assert type(est[1]) is nn.BatchNorm2d and type(net[1]) is SyncBatchNorm
    torch.testing.assert_close(est[1].running_mean, net[0](normalize(x, (0.5,), (0.5,))).mean((0, 2, 3)))
