"""Fine-tuning: top-k and k-NN by hand, seeding, resume, the test split only at the end, checkpoints, notebook 03."""
import json
import math

import pytest
import torch

from bissl_kit.bissl import BisslConfig, build_trainer
from bissl_kit.checkpoint import CheckpointError, load_checkpoint
from bissl_kit.config import ConfigError
from bissl_kit.evaluate import knn_accuracy
from bissl_kit.backbones import load_backbone
from bissl_kit.downstream import evaluate_split, load_data
from bissl_kit.evaluate import accuracy_topk
from bissl_kit.finetune import FinetuneConfig, Finetuner, describe_source, finetune, load_finetuned, read_metrics
from bissl_kit.pretrain import PretrainConfig, pretrain


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_runs(root):
    """A 4-step pre-training and a 1-stage BiSSL run on digits: checkpoints of both source kinds."""
    pre = PretrainConfig(steps=4, batch_size=16, warmup_steps=1, width=4, proj_hidden=16, proj_dim=8, image_size=8,
                         knn_every=0, checkpoint_every=4, progress=False, device="cpu", out_dir=str(root / "pretrain"))
    pretrain(pre)
    bissl = BisslConfig.embedded(pretrain_checkpoint=str(root / "pretrain" / "checkpoint.pt"), stages=1, lower_steps=2,
                                 upper_steps=2, lower_batch_size=16, upper_batch_size=16, head_warmup_epochs=1,
                                 solver_iters=3, progress=False, device="cpu", out_dir=str(root / "bissl"))
    for _ in build_trainer(bissl).run():
        pass
    return root / "pretrain" / "checkpoint.pt", root / "bissl" / "checkpoint.pt"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return tiny_runs(tmp_path_factory.mktemp("sources"))


@pytest.fixture
def tiny_ft(sources, tmp_path):
    # 30 labelled digits per class: 300 train images, 3 batches per epoch (seconds per run)
    return FinetuneConfig(backbone_checkpoint=str(sources[1]), labels_per_class=30, epochs=2, batch_size=128,
                          lr=0.05, progress=False, device="cpu", checkpoint_every=1, out_dir=str(tmp_path / "ft"))


def states_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


# ---- the metrics, by hand ------------------------------------------------------------------------------

def test_topk_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.3],    # label 1 is top-1
                           [0.5, 0.2, 0.4, 0.1],    # label 2 is 2nd: top-5 (capped at 4 classes) only
                           [0.0, 0.1, 0.2, 0.3]])   # label 0 is last: in top-4 = all classes
    labels = torch.tensor([1, 2, 0])
    acc = accuracy_topk(logits, labels, ks=(1, 2, 5))
    assert acc[1] == pytest.approx(1 / 3)
    assert acc[2] == pytest.approx(2 / 3)
    assert acc[5] == pytest.approx(1.0)  # k is capped at the 4 classes


def test_knn_weighted_vote_by_hand():
    # three classes; query (1, 0); neighbours at cosine 1.0 (class 2), 0.8 and 0.6 (class 1), 0 (class 0)
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([2, 1, 1, 0])
    q = torch.tensor([[2.0, 0.0]])  # not unit length: the vote uses cosine similarity
    # T = 1: class 1 gets e^0.8 + e^0.6 = 4.05 > class 2's e^1 = 2.72, so k = 3 predicts class 1
    assert knn_accuracy(train, labels, q, torch.tensor([1]), k=3, temperature=1.0).accuracy == 1.0
    # T = 0.1: e^10 = 22026 > e^8 + e^6 = 3384, so the nearest neighbour's class 2 wins
    assert math.exp(10) > math.exp(8) + math.exp(6)
    assert knn_accuracy(train, labels, q, torch.tensor([2]), k=3, temperature=0.1).accuracy == 1.0


# ---- fine-tuning runs ------------------------------------------------------------------------------------

def test_same_seed_reproduces_the_run_and_another_seed_differs(tiny_ft, tmp_path):
    a = Finetuner(tiny_ft)
    list(a.run())
    b = Finetuner(tiny_ft.replace(out_dir=str(tmp_path / "b")))
    list(b.run())
    assert states_equal(a.backbone.state_dict(), b.backbone.state_dict())
    assert states_equal(a.head.state_dict(), b.head.state_dict())
    assert a.result["test_top1"] == b.result["test_top1"]
    c = Finetuner(tiny_ft.replace(out_dir=str(tmp_path / "c"), seed=1))
    list(c.run())
    assert not torch.equal(a.head.weight, c.head.weight)


def test_records_protocols_and_schedule(tiny_ft):
    records = list(Finetuner(tiny_ft).run())
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    final = records[-1]
    # 300 train images in batches of 128: 2 full + 1 partial (kept) per epoch
    assert len(steps) == 2 * 3 and [r["step"] for r in steps] == list(range(1, 7))
    assert steps[0]["lr"] == tiny_ft.lr and steps[-1]["lr"] < 0.1 * tiny_ft.lr  # cosine, first step at the full lr
    assert [e["epoch"] for e in epochs] == [1, 2] and all("val_top1" in e for e in epochs)
    assert final["kind"] == "final" and final["n_val"] == 287 and final["n_test"] == 359
    for key, split in (("protocol", "val"), ("test_protocol", "test")):
        assert f"digits:30 {split} (n=" in final[key] and "2 epochs" in final[key] and "seed 0" in final[key]
        assert "BiSSL lower backbone" in final[key]
    assert read_metrics(tiny_ft.out_dir) == records


def test_interrupted_run_resumes_to_identical_parameters(tiny_ft, tmp_path):
    full = Finetuner(tiny_ft.replace(out_dir=str(tmp_path / "full")))
    list(full.run())
    cut = Finetuner(tiny_ft)
    for rec in cut.run():
        if rec["kind"] == "step" and rec["step"] == 5:
            break  # killed in epoch 2; the checkpoint holds epoch 1
    resumed = Finetuner(tiny_ft)
    assert resumed.epoch == 1
    list(resumed.run())
    assert states_equal(full.backbone.state_dict(), resumed.backbone.state_dict())
    assert resumed.result["test_top1"] == full.result["test_top1"]
    steps = [r["step"] for r in read_metrics(tiny_ft.out_dir) if r["kind"] == "step"]
    assert steps == list(range(1, 7))  # the redone steps are logged once


def test_test_split_is_loaded_only_at_the_end_and_only_when_asked(tiny_ft, sources):
    pre = load_backbone(tiny_ft.backbone_checkpoint).pretrain_config
    data = load_data("digits", pre, labels_per_class=30)
    trial = tiny_ft.replace(test=False)
    res = finetune(trial, data=data)
    assert data._test is None  # a search trial never loads the test split
    assert not any(k.startswith("test") for k in res)
    # the same run asked for its test numbers later: no training, one final record
    again = Finetuner(trial.replace(test=True), data=data)
    records = list(again.run())
    assert [r["kind"] for r in records] == ["final"]
    assert records[0]["val_top1"] == res["val_top1"] and "test_top1" in records[0]
    with pytest.raises(CheckpointError, match="another config.*lr"):
        Finetuner(trial.replace(lr=0.01), data=data)


def test_best_val_selection_and_load_finetuned_give_the_reported_model(tiny_ft):
    cfg = tiny_ft.replace(select="best_val", epochs=3)
    res = finetune(cfg)
    history = [r for r in read_metrics(cfg.out_dir) if r["kind"] == "epoch"]
    best = max(history, key=lambda r: (r["val_top1"], -r["epoch"]))
    assert res["selected_epoch"] == best["epoch"] and res["val_top1"] == best["val_top1"]
    backbone, head, loaded_cfg = load_finetuned(f"{cfg.out_dir}/checkpoint.pt")
    assert loaded_cfg == cfg and not backbone.training
    data = load_data("digits", load_backbone(cfg.backbone_checkpoint).pretrain_config)
    val = evaluate_split(backbone, head, data.val, mean=data.mean, std=data.std)
    assert val["top1"] == res["val_top1"]
    ckpt = load_checkpoint(f"{cfg.out_dir}/checkpoint.pt", kind="finetune")
    assert "optimizer" not in ckpt["state"]  # a finished run keeps only the model it reports


def test_every_source_kind_loads_and_others_are_refused(sources, tiny_ft, tmp_path):
    pre_ckpt, bissl_ckpt = sources
    l1, l2 = load_backbone(pre_ckpt), load_backbone(bissl_ckpt)
    s1, s2 = describe_source(l1), describe_source(l2)
    assert (s1["kind"], s2["kind"], s2["role"]) == ("pretrain", "bissl", "lower")
    assert l1.pretrain_config == l2.pretrain_config and s2["lower_steps"] == 2
    assert not torch.equal(l1.backbone.conv1.weight, l2.backbone.conv1.weight)  # BiSSL's lower steps moved θ_P
    finetune(tiny_ft.replace(epochs=1))
    with pytest.raises(CheckpointError, match="a 'finetune' checkpoint; fine-tuning starts from a pre-training or a BiSSL"):
        Finetuner(tiny_ft.replace(backbone_checkpoint=f"{tiny_ft.out_dir}/checkpoint.pt", out_dir=str(tmp_path / "again")))


def test_non_finite_loss_stops_the_run_naming_the_step(tiny_ft):
    with pytest.raises(FloatingPointError, match="fine-tuning loss is .* at epoch 1"):
        finetune(tiny_ft.replace(lr=1e8))


@pytest.mark.parametrize("field,value,needle", [
    ("epochs", 0, "epochs=0 is out of range; epochs must be >= 1"),
    ("select", "best", "select='best' is not allowed; select must be one of 'last', 'best_val'"),
    ("lr", 0.0, "lr=0.0 is out of range"),
    ("downstream", "mnist", "downstream='mnist' is not allowed"),
    ("device", "tpu", "device='tpu'"),
])
def test_bad_finetune_config_is_rejected(field, value, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        FinetuneConfig(**{field: value})
    with pytest.raises(ConfigError, match="unknown FinetuneConfig parameter.*'lrr'.*did you mean 'lr'"):
        FinetuneConfig.from_dict({"lrr": 0.1})


@pytest.mark.slow
def test_03_finetune_notebook_runs_headless(sources, tmp_path, monkeypatch):
    from bissl_kit.notebooks import QUICK, execute
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's threads; tiny tensors (see one_thread)
    params = {**QUICK["03_finetune"], "backbone_checkpoint": str(sources[1]), "out_dir": str(tmp_path / "ft"),
              "figures_dir": str(tmp_path / "fig")}
    out = execute("03_finetune", params, output_dir=tmp_path / "nb")
    text = json.dumps(json.loads(out.read_text()))
    assert out.stat().st_size < 2_000_000
    assert "weighted k-NN" in text and "digits test (n=359)" in text
    assert (tmp_path / "fig" / "03_finetune_curves.html").exists()
    _, _, cfg = load_finetuned(tmp_path / "ft" / "checkpoint.pt")
    assert cfg.epochs == QUICK["03_finetune"]["epochs"]
