"""Pre-training loop: seeding, resume, checkpoints and their error paths (real Fashion-MNIST)."""

import pytest
import torch

from bissl_kit.checkpoint import CheckpointError, load_checkpoint
from bissl_kit.config import ConfigError
from bissl_kit.pretrain import Pretrainer, load_pretrained, pretrain, read_metrics


def params_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_logs_loss_and_knn_with_protocol(tiny_pretrain):
    records = pretrain(tiny_pretrain)
    steps = [r for r in records if "loss" in r]
    knn = [r for r in records if "knn" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in knn] == [0, 3, 6]  # step 0 is the random-init control
    assert all(0 <= r["knn"] <= 1 and "k=20" in r["protocol"] and "digits val" in r["protocol"] for r in knn)
    assert read_metrics(tiny_pretrain.out_dir) == records
    ckpt = load_checkpoint(f"{tiny_pretrain.out_dir}/checkpoint.pt", kind="pretrain")
    assert ckpt["step"] == 6 and ckpt["config"] == tiny_pretrain.to_dict()


def test_same_seed_same_parameters_other_seed_differs(tiny_pretrain, tmp_path):
    a = Pretrainer(tiny_pretrain)
    list(a.run())
    b = Pretrainer(tiny_pretrain.replace(out_dir=str(tmp_path / "b")))
    list(b.run())
    assert_same(params_of(a.model), params_of(b.model))
    c = Pretrainer(tiny_pretrain.replace(out_dir=str(tmp_path / "c"), seed=1))
    list(c.run())
    assert not torch.equal(a.model.backbone.conv1.weight, c.model.backbone.conv1.weight)


def test_interrupted_run_resumes_to_identical_parameters(tiny_pretrain, tmp_path):
    full = Pretrainer(tiny_pretrain.replace(out_dir=str(tmp_path / "full")))
    list(full.run())
    cfg = tiny_pretrain.replace(out_dir=str(tmp_path / "cut"))
    first = Pretrainer(cfg)
    for rec in first.run():
        if rec.get("step") == 4 and "loss" in rec:
            break  # stopped after step 4; the last checkpoint is step 3
    resumed = Pretrainer(cfg)
    assert resumed.step == 3
    list(resumed.run())
    assert_same(params_of(full.model), params_of(resumed.model))
    steps = [r["step"] for r in read_metrics(cfg.out_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the redone step 4 is logged once


def test_resume_refuses_another_config_and_keeps_the_checkpoint(tiny_pretrain):
    pretrain(tiny_pretrain)
    path = f"{tiny_pretrain.out_dir}/checkpoint.pt"
    before = open(path, "rb").read()
    with pytest.raises(CheckpointError, match=r"another config \(lr: saved 1.2, now 0.5\)"):
        Pretrainer(tiny_pretrain.replace(lr=0.5))
    assert open(path, "rb").read() == before
    # fields that do not change the numbers may differ
    Pretrainer(tiny_pretrain.replace(knn_every=0, progress=True))


def test_truncated_checkpoint_is_a_clear_error_and_is_not_overwritten(tiny_pretrain):
    pretrain(tiny_pretrain)
    path = f"{tiny_pretrain.out_dir}/checkpoint.pt"
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        Pretrainer(tiny_pretrain)
    assert len(open(path, "rb").read()) == len(data) // 2


def test_checkpoint_of_another_architecture_names_the_difference(tiny_pretrain, tmp_path):
    from bissl_kit.backbones import check_recipe
    pretrain(tiny_pretrain)
    path = f"{tiny_pretrain.out_dir}/checkpoint.pt"
    with pytest.raises(CheckpointError, match="width: checkpoint 4 vs model 8"):
        check_recipe(load_checkpoint(path, kind="pretrain")["backbone"], {"arch": "resnet18", "width": 8}, where=path)
    with pytest.raises(CheckpointError, match="expected 'bissl'"):
        load_checkpoint(path, kind="bissl")
    # a run continuing it must keep its network
    with pytest.raises(ConfigError, match="init_checkpoint=.* is a pre-training run with other settings "
                                          r"\(width: checkpoint 4 vs config 8\)"):
        Pretrainer(tiny_pretrain.replace(width=8, init_checkpoint=path, out_dir=str(tmp_path / "more")))


def test_load_pretrained_restores_the_model(tiny_pretrain):
    trainer = Pretrainer(tiny_pretrain)
    list(trainer.run())
    model, cfg = load_pretrained(f"{tiny_pretrain.out_dir}/checkpoint.pt")
    assert cfg == tiny_pretrain
    assert_same(params_of(trainer.model), params_of(model))


def test_byol_runs_and_moves_its_target(tiny_pretrain):
    trainer = Pretrainer(tiny_pretrain.replace(method="byol", steps=3, knn_every=0, warmup_steps=1))
    target_before = trainer.model.target["backbone"].conv1.weight.clone()
    list(trainer.run())
    assert not torch.equal(target_before, trainer.model.target["backbone"].conv1.weight)
    assert not torch.equal(trainer.model.backbone.conv1.weight, trainer.model.target["backbone"].conv1.weight)


def test_batch_larger_than_dataset_is_rejected_before_training(tiny_pretrain):
    with pytest.raises(ConfigError, match="batch_size=100000 is larger than the pretext set"):
        Pretrainer(tiny_pretrain.replace(batch_size=100000))


# ---- the k-NN monitor's BN protocols and the embedded augmentation ---------------------------------

def test_knn_records_both_bn_protocols_and_leaves_the_model_untouched(tiny_pretrain):
    trainer = Pretrainer(tiny_pretrain)
    trainer.model.train()
    before = params_of(trainer.model)
    rec = trainer._knn_record()  # random init: what step 0 logs
    assert set(rec["knn_by_bn"]) == {"pretext", "running"} and rec["knn"] == rec["knn_by_bn"]["pretext"]
    assert "BN statistics re-estimated on 5120 un-augmented pretext images" in rec["protocol"]
    assert trainer.model.training  # the mode is kept, and no parameter or BN buffer moved
    assert_same(before, params_of(trainer.model))
    assert len(trainer.bn_images) == 5120 and trainer.bn_images.dtype == torch.uint8
    # the fixed BN images do not depend on the seed; 'running' is the backbone as it is
    other = Pretrainer(tiny_pretrain.replace(seed=3, out_dir=tiny_pretrain.out_dir + "_s3"))
    assert torch.equal(other.bn_images, trainer.bn_images)
    running = trainer.knn("running")
    assert running.accuracy == rec["knn_by_bn"]["running"]
    rec2 = Pretrainer(tiny_pretrain.replace(knn_bn="running", out_dir=tiny_pretrain.out_dir + "_r"))._knn_record()
    assert rec2["knn"] == rec2["knn_by_bn"]["running"] == running.accuracy and "as held" in rec2["protocol"]


def test_embedded_views_have_no_flip_and_a_low_resolution_view_paper_keeps_its_flip():
    from bissl_kit.pretrain import PretrainConfig, pretext_view_specs
    cfg = PretrainConfig()
    assert cfg.flip_p is None and cfg.lowres_p is None and cfg.knn_bn == "pretext"
    v = pretext_view_specs(cfg, 1)[0]
    assert (v.flip_p, v.lowres_p, v.lowres_size, v.scale) == (0.0, 0.5, (6, 12), (0.3, 1.0))
    v = pretext_view_specs(cfg.replace(flip_p=0.5, lowres_p=0.0, lowres_size=(4, 8)), 1)[0]
    assert (v.flip_p, v.lowres_p, v.lowres_size) == (0.5, 0.0, (4, 8))
    paper = pretext_view_specs(cfg.replace(paper_augment=True), 3)
    assert all(s.flip_p == 0.5 and s.lowres_p == 0.0 for s in paper)
    with pytest.raises(ConfigError, match="lowres_size"):
        PretrainConfig(lowres_size=(6, 20))


def test_a_config_saved_before_lowres_and_knn_bn_reads_as_what_it_ran():
    from bissl_kit.pretrain import PretrainConfig, pretext_view_specs
    old = PretrainConfig().to_dict()
    del old["lowres_p"], old["lowres_size"], old["knn_bn"]
    old["flip_p"] = 0.5
    cfg = PretrainConfig.from_saved(old)
    assert (cfg.lowres_p, cfg.knn_bn, cfg.flip_p) == (0.0, "running", 0.5)
    v = pretext_view_specs(cfg, 1)[0]
    assert v.lowres_p == 0.0 and v.flip_p == 0.5
    assert PretrainConfig.from_saved(PretrainConfig().to_dict()) == PretrainConfig()  # new ones unchanged


def test_a_config_saved_when_none_meant_the_chains_own_reads_as_what_it_ran():
    from bissl_kit.pretrain import PretrainConfig
    for paper, forward, partial in ((False, "joint", "drop"), (True, "per_view", "keep")):
        old = {**PretrainConfig().to_dict(), "paper_augment": paper, "pretext_forward": None, "partial_batch": None}
        cfg = PretrainConfig.from_saved(old)
        assert (cfg.pretext_forward, cfg.partial_batch) == (forward, partial)


def test_pretraining_runs_one_forward_per_view_and_keeps_the_partial_batch(tiny_pretrain):
    from bissl_kit.pretrain import PretrainConfig, as_run
    assert (PretrainConfig().pretext_forward, PretrainConfig().partial_batch) == ("per_view", "keep")
    # a run saved before the fields existed ran joint forwards and dropped the partial batch
    old = PretrainConfig().to_dict()
    del old["pretext_forward"], old["partial_batch"]
    assert (as_run(old)["pretext_forward"], as_run(old)["partial_batch"]) == ("joint", "drop")
    # 60,000 Fashion-MNIST images in batches of 7: 8571 full batches and one of 3
    trainer = Pretrainer(tiny_pretrain.replace(batch_size=7, steps=3))
    assert (trainer.partial, trainer.batches_per_epoch) == (3, 8572)
    assert trainer.model.pretext_forward == "per_view"
    assert len(trainer.batch(8571)) == 3 and len(trainer.batch(8572)) == 7  # the epoch's last batch, then the next epoch
    dropped = Pretrainer(tiny_pretrain.replace(batch_size=7, steps=3, partial_batch="drop", pretext_forward="joint"))
    assert (dropped.partial, dropped.batches_per_epoch, dropped.model.pretext_forward) == (0, 8571, "joint")
    with pytest.raises(ConfigError, match=r"batch_size=59999 with partial_batch='keep' leaves a last batch of 1 image"):
        Pretrainer(tiny_pretrain.replace(batch_size=59_999))


def test_a_run_saved_before_the_forward_fields_resumes_only_as_what_it_ran(tiny_pretrain):
    cfg = tiny_pretrain.replace(steps=3, warmup_steps=1, pretext_forward="joint", partial_batch="drop")
    list(Pretrainer(cfg).run())
    path = f"{tiny_pretrain.out_dir}/checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    del ckpt["config"]["pretext_forward"], ckpt["config"]["partial_batch"]
    torch.save(ckpt, path)
    assert Pretrainer(cfg).step == 3  # what the old run ran: no conflict
    with pytest.raises(CheckpointError, match="pretext_forward: saved 'joint', now 'per_view'"):
        Pretrainer(cfg.replace(pretext_forward="per_view"))
