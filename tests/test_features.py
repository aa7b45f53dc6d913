"""Feature analysis (notebook 04): every stage's backbone, extraction, the separability score by hand,
Procrustes alignment, missing checkpoints, the explorer widget, and the notebook under papermill."""
import json
import math

import numpy as np
import pytest
import torch

from bissl_kit.bissl import BisslConfig, build_trainer
from bissl_kit.checkpoint import CheckpointError, load_checkpoint
from bissl_kit.config import ConfigError
from bissl_kit.evaluate import frozen_features, separability, silhouette_samples
from bissl_kit.features import FeaturesConfig, collect_stages, load_stage, load_task, measure, procrustes_align
from bissl_kit.pretrain import PretrainConfig, pretrain


def stage_features(stage, data, bn_images=None):
    return frozen_features(stage.backbone, data.train_images, data.eval_images, mean=data.mean, std=data.std,
                           bn_images=bn_images)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4-step pre-training, a 1-stage BiSSL run and a 1-epoch fine-tuning of θ_P, all on digits at 8 px.
    The fine-tuning run is *not* at <root>/finetune, so "whatever exists" under <root> lacks it."""
    from bissl_kit.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("features_runs")
    pretrain(PretrainConfig(steps=4, batch_size=16, warmup_steps=1, width=4, proj_hidden=16, proj_dim=8, image_size=8,
                            knn_every=0, checkpoint_every=4, progress=False, device="cpu",
                            out_dir=str(root / "pretrain")))
    bissl = BisslConfig.embedded(pretrain_checkpoint=str(root / "pretrain" / "checkpoint.pt"), stages=1, lower_steps=2,
                                 upper_steps=2, lower_batch_size=16, upper_batch_size=16, head_warmup_epochs=1,
                                 solver_iters=3, progress=False, device="cpu", out_dir=str(root / "bissl"))
    for _ in build_trainer(bissl).run():
        pass
    finetune(FinetuneConfig(backbone_checkpoint=str(root / "bissl" / "checkpoint.pt"), epochs=1, batch_size=128,
                            test=False, progress=False, device="cpu", out_dir=str(root / "ft_elsewhere")))
    return root


def explicit(root, **extra):
    return FeaturesConfig(runs_dir=str(root), pretrain_checkpoint=str(root / "pretrain" / "checkpoint.pt"),
                          bissl_checkpoint=str(root / "bissl" / "checkpoint.pt"),
                          finetune_checkpoints=(str(root / "ft_elsewhere" / "checkpoint.pt"),), **extra)


# ---- stages and extraction --------------------------------------------------------------------------------

def test_every_stage_loads_and_extraction_has_the_right_shapes_and_repeats_exactly(runs):
    stages, notes = collect_stages(explicit(runs), log=lambda _: None)
    assert [s.key for s in stages] == ["random", "pretrained", "bissl_lower", "bissl_upper", "finetuned_bissl"]
    assert notes == []
    assert stages[-1].label == "fine-tuned (BiSSL)"
    data = load_task("digits", None, "val", stages[0].pre_cfg)
    assert data.train_images.shape[-1] == 8 and len(data.eval_labels) == 287
    feats = {}
    for s in stages:
        train_f, eval_f = stage_features(s, data)
        assert train_f.shape == (1151, s.backbone.feat_dim) and eval_f.shape == (287, 32)  # width 4 → 8·4 = 32
        assert train_f.dtype == torch.float32 and torch.isfinite(train_f).all()
        again = stage_features(s, data)
        assert torch.equal(again[0], train_f) and torch.equal(again[1], eval_f)  # bit-identical on CPU
        feats[s.key] = eval_f
    # five different backbones give five different feature sets
    keys = list(feats)
    assert all(not torch.allclose(feats[a], feats[b]) for i, a in enumerate(keys) for b in keys[i + 1:])


def test_pretext_bn_protocol_re_estimates_on_a_copy_for_every_stage_alike(runs):
    from bissl_kit.data import load_pretext
    from bissl_kit.evaluate import estimate_bn_stats, extract_features
    from bissl_kit.pretrain import knn_bn_images
    stages, _ = collect_stages(explicit(runs, stages=("random", "pretrained")), log=lambda _: None)
    data = load_task("digits", None, "val", stages[0].pre_cfg)
    bn_images = knn_bn_images(load_pretext(image_size=8))
    for s in stages:
        before = {k: v.clone() for k, v in s.backbone.state_dict().items()}
        _, held = stage_features(s, data)
        _, pretext = stage_features(s, data, bn_images=bn_images)
        assert all(torch.equal(before[k], v) for k, v in s.backbone.state_dict().items())  # the stage's own BN untouched
        assert not torch.allclose(held, pretext)
        copy = estimate_bn_stats(s.backbone, bn_images, mean=data.mean, std=data.std)
        assert torch.equal(pretext, extract_features(copy, data.eval_images, mean=data.mean, std=data.std))
    # the analysis states which statistics its numbers used
    assert "re-estimated" in measure(explicit(runs, stages=("random", "pretrained"), probe_epochs=1)).protocols["bn"]
    assert "as held" in measure(explicit(runs, stages=("random", "pretrained"), probe_epochs=1, bn="running")).protocols["bn"]


def test_random_init_is_step_zero_of_the_pretraining_run(runs):
    from bissl_kit.pretrain import build_model
    stages, _ = collect_stages(explicit(runs, stages=("random", "pretrained")), log=lambda _: None)
    pre = stages[1].pre_cfg
    fresh = build_model(pre, 1).backbone.state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in stages[0].backbone.state_dict().items())


def test_theta_d_is_the_upper_backbone_of_the_bissl_checkpoint(runs):
    path = runs / "bissl" / "checkpoint.pt"
    upper = load_stage(path, "bissl_upper").backbone
    saved = load_checkpoint(path)["backbones"]
    assert all(torch.equal(saved["upper"][k], v) for k, v in upper.state_dict().items())
    lower = load_stage(path, "bissl_lower").backbone.state_dict()
    assert lower.keys() == upper.state_dict().keys()
    assert any(not torch.equal(lower[k], v) for k, v in upper.state_dict().items())  # the two levels moved apart


def test_missing_default_checkpoints_are_skipped_but_a_named_missing_one_is_an_error(runs):
    notes = []
    stages, skipped = collect_stages(FeaturesConfig(runs_dir=str(runs)), log=notes.append)
    assert [s.key for s in stages] == ["random", "pretrained", "bissl_lower", "bissl_upper"]
    assert skipped == notes and len(notes) == 1 and "skipped 'finetuned'" in notes[0]
    with pytest.raises(CheckpointError, match="finetune_checkpoints: checkpoint .*nope.pt.* does not exist"):
        collect_stages(FeaturesConfig(runs_dir=str(runs), finetune_checkpoints=(str(runs / "nope.pt"),)))
    with pytest.raises(CheckpointError, match="bissl_checkpoint: checkpoint"):
        collect_stages(FeaturesConfig(runs_dir=str(runs), bissl_checkpoint=str(runs / "nope.pt")))
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        collect_stages(FeaturesConfig(runs_dir=str(runs / "empty")), log=lambda _: None)


def test_a_stage_from_another_pretraining_run_is_flagged():
    from bissl_kit.features.stages import _lineage_differences
    a = PretrainConfig(steps=300, out_dir="runs/a")
    assert _lineage_differences(a, PretrainConfig(steps=300, out_dir="elsewhere", progress=False)) == ""
    assert _lineage_differences(a, PretrainConfig(steps=600, temperature=0.5)) == "temperature: 0.2 vs 0.5; steps: 300 vs 600"


@pytest.mark.parametrize("values, needle", [
    ({"stages": ("pretrained", "finetune")}, "stages=.*each must be one of"),
    ({"stages": ()}, "stages="),
    ({"split": "train"}, "split='train' is not allowed"),
    ({"umap_fit": "tsne"}, "umap_fit='tsne' is not allowed"),
    ({"n_neighbors": 1}, "n_neighbors=1 is out of range"),
    ({"labels_per_class": 5}, "labels_per_class needs downstream"),
    ({"downstream": "mnist"}, "downstream='mnist'"),
    ({"n_neighbours": 5}, "did you mean 'n_neighbors'"),
])
def test_bad_config_is_rejected_naming_the_field(values, needle):
    with pytest.raises(ConfigError, match=needle):
        FeaturesConfig.from_dict(values)


# ---- the separability score ----------------------------------------------------------------------------------

def test_silhouette_by_hand():
    # 1-D, Euclidean: class 0 at {0, 1}, class 1 at {3, 5}
    x = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    y = torch.tensor([0, 0, 1, 1])
    a = [1, 1, 2, 2]
    b = [(3 + 5) / 2, (2 + 4) / 2, (3 + 2) / 2, (5 + 4) / 2]
    expected = [(bi - ai) / max(ai, bi) for ai, bi in zip(a, b)]
    got = silhouette_samples(x, y, metric="euclidean")
    assert got.tolist() == pytest.approx(expected)
    res = separability(x, y, metric="euclidean")
    assert res.silhouette == pytest.approx(sum(expected) / 4) and "euclidean" in res.protocol()


def test_silhouette_is_one_for_classes_on_orthogonal_rays_and_zero_for_a_singleton():
    # cosine distance: within a class 0 (same direction, any length), between classes 1
    x = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 3.0, 0], [0, 0.5, 0], [0, 0, 1.0]])
    s = silhouette_samples(x, torch.tensor([0, 0, 1, 1, 2]))
    assert s.tolist() == pytest.approx([1, 1, 1, 1, 0])  # the lone class-2 sample scores 0 by convention


# ---- alignment ------------------------------------------------------------------------------------------------

def test_procrustes_undoes_a_rotation_reflection_scale_and_shift():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 2))
    t = 0.7
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]) @ np.diag([1, -1])
    moved = 3.5 * ref @ rot + np.array([10.0, -4.0])
    assert np.allclose(procrustes_align(moved, ref), ref)
    # a picture unlike the reference is not shrunk: it keeps the reference's spread
    other = rng.normal(size=(50, 2)) * 100
    out = procrustes_align(other, ref)
    spread = lambda z: np.sqrt(((z - z.mean(0)) ** 2).sum())  # noqa: E731
    assert spread(out) == pytest.approx(spread(ref))
    # and only rigidly moved: pairwise distances scale by one factor
    d = lambda z: np.linalg.norm(z[:, None] - z[None], axis=-1)  # noqa: E731
    ratio = d(out)[np.triu_indices(50, 1)] / d(other)[np.triu_indices(50, 1)]
    assert np.allclose(ratio, ratio[0])


# ---- numbers and the explorer (no UMAP here: the notebook test below pays its ~10 s compile) ----------------

def test_measure_gives_protocols_and_the_explorer_redraws_in_place(runs):
    cfg = explicit(runs, stages=("random", "pretrained", "bissl_lower"), probe_epochs=5, max_points=60)
    a = measure(cfg, log=lambda _: None)
    assert [r.key for r in a.stages] == ["random", "pretrained", "bissl_lower"] and a.reference == "pretrained"
    assert len(a.pictured) == 60 and len(np.unique(a.data.eval_labels[a.pictured])) == 10  # every class pictured
    assert "k=20" in a.protocols["knn"] and "5 epochs" in a.protocols["probe"] and "cosine" in a.protocols["silhouette"]
    for r in a.stages:
        assert 0 <= r.knn <= 1 and 0 <= r.probe <= 1 and -1 <= r.silhouette <= 1
        assert r.knn == pytest.approx(r.knn_correct.mean())
        assert r.features.shape == (60, 32)
        r.embedding = r.features[:, :2].astype(np.float64)  # any 2-D picture will do for the widget
    from bissl_kit.viz.features import StageExplorer
    ex = StageExplorer(a)
    fig = ex.figure
    x_before = np.concatenate([np.asarray(t.x) for t in fig.data[:10]])
    assert "pre-trained" in fig.layout.title.text
    assert ex.stage_switch.description == "Stage" and StageExplorer.STAGE_CLASS in ex.stage_switch._dom_classes
    ex.stage_switch.value = "bissl_lower"  # what a click does
    assert ex.figure is fig and "BiSSL θ_P" in fig.layout.title.text
    assert not np.array_equal(np.concatenate([np.asarray(t.x) for t in fig.data[:10]]), x_before)
    ex.colour_switch.value = "knn"
    assert [t.visible for t in fig.data] == [False] * 10 + [True, True, False]
    ex.select([0, 5])
    assert ex.thumbnails.value.count("<img") == 2


# ---- notebook 04 under papermill --------------------------------------------------------------------------------

@pytest.mark.slow
def test_04_features_umap_runs_headless(runs, tmp_path):
    from bissl_kit.notebooks import QUICK, execute
    params = {**QUICK["04_features_umap"], "runs_dir": str(runs), "figures_dir": str(tmp_path / "figures"),
              "max_points": 120, "n_neighbors": 8}
    out = execute("04_features_umap", params, output_dir=tmp_path / "nb")
    nb = json.loads(out.read_text())
    assert "widgets" not in nb["metadata"] and out.stat().st_size < 2_000_000
    text = json.dumps(nb)
    assert "skipped 'finetuned'" in text  # nothing at <runs>/finetune: a note, not a crash
    assert "weighted k-NN (cosine, k=20, T=0.07), 1151 train" in text and "linear probe" in text
    assert "Procrustes-aligned to 'pre-trained'" in text
    assert "headless run: the explorer is shown only with live=True" in text
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {f"04_features_{n}.html" for n in ("umap", "metrics", "fixed", "broken")} <= figures
