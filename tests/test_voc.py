"""VOC2007 classification: the multi-label set, its losses (softmax CE on multi-hot, as the official code, or
BCE) and its metric (the VOC2007 11-point mAP), on a fake VOC2007 in its real layout and through the CLI."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bissl_kit import data
from bissl_kit.data import DataNotFoundError, load_downstream
from bissl_kit.evaluate import average_precision, mean_average_precision
from bissl_kit.losses import downstream_loss

sys.path.insert(0, str(Path(__file__).parent))
from fake_datasets import shade, write_voc2007  # noqa: E402


# ---- the metric, against the VOC2007 definition written out ---------------------------------------------

def voc07_ap_oracle(scores, positive, difficult):
    """VOCevalcls of the VOC2007 devkit for one class: rank by score, difficult images count neither as true
    nor as false positives, AP = mean over t = 0, 0.1, ..., 1 of max precision at recall >= t."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    tp = fp = 0
    prec, rec = [], []
    n_pos = sum(1 for p, d in zip(positive, difficult) if p and not d)
    for i in order:
        if difficult[i]:
            continue
        tp, fp = tp + bool(positive[i]), fp + (not positive[i])
        prec.append(tp / (tp + fp))
        rec.append(tp / n_pos)
    return sum(max([p for p, r in zip(prec, rec) if r >= t / 10], default=0.0) for t in range(11)) / 11


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_is_the_voc2007_eleven_point_ap_with_difficult_images_ignored(seed):
    g = torch.Generator().manual_seed(seed)
    n, c = 60, 7
    scores = torch.randn(n, c, generator=g)
    targets = (torch.rand(n, c, generator=g) < 0.3).float()
    targets[:10, 0] = 1  # class 0: exactly 10 positives hit recall 0.1, 0.2, ... exactly
    targets[10:, 0] = 0
    difficult = (torch.rand(n, c, generator=g) < 0.15) & (targets > 0)
    difficult[:, 0] = False
    ap = average_precision(scores, targets, difficult)
    want = [voc07_ap_oracle(scores[:, k].tolist(), targets[:, k].tolist(), difficult[:, k].tolist()) for k in range(c)]
    assert ap.dtype == torch.float64
    assert ap.tolist() == pytest.approx(want, abs=1e-12)
    assert mean_average_precision(scores, targets, difficult) == pytest.approx(sum(want) / c, abs=1e-12)
    # a difficult mark changes the AP of its class only
    more = difficult.clone()
    more[targets[:, 3] > 0, 3] = False
    changed = average_precision(scores, targets, more)
    assert torch.equal(changed[[0, 1, 2, 4, 5, 6]], ap[[0, 1, 2, 4, 5, 6]])


def test_non_interpolated_ap_is_sklearns_on_the_images_not_ignored():
    from sklearn.metrics import average_precision_score
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(80, 5, generator=g)
    targets = (torch.rand(80, 5, generator=g) < 0.4).float()
    difficult = (torch.rand(80, 5, generator=g) < 0.2) & (targets > 0)
    ap = average_precision(scores, targets, difficult, interpolated=False)
    for k in range(5):
        keep = ~difficult[:, k]
        assert ap[k].item() == pytest.approx(average_precision_score(targets[keep, k], scores[keep, k]), abs=1e-12)


def test_map_perfect_ranking_absent_classes_and_shapes():
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.float32)
    assert average_precision(targets * 5 - 1, targets).tolist()[:2] == [1.0, 1.0]
    assert math.isnan(average_precision(targets, targets)[2])  # class 2 has no positive
    assert mean_average_precision(targets * 5 - 1, targets) == 1.0  # ... and is left out of the mean
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(torch.zeros(3, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="N×C"):
        average_precision(torch.zeros(3, 2), targets)


# ---- the losses, against their formulas in float64 --------------------------------------------------------

def test_multilabel_losses_are_their_formulas_in_float64():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 20, generator=g, dtype=torch.float64)
    t = (torch.rand(6, 20, generator=g) < 0.2).double()
    t[0] = 0
    t[0, 4] = 1
    log_softmax = z - z.exp().sum(1, keepdim=True).log()
    softmax_ce = -(t * log_softmax).sum(1).mean()  # nn.CrossEntropyLoss fed the multi-hot vector (official)
    sigmoid = 1 / (1 + (-z).exp())
    bce = -(t * sigmoid.log() + (1 - t) * (1 - sigmoid).log()).mean()
    assert downstream_loss(z, t).item() == pytest.approx(softmax_ce.item(), rel=1e-12)
    assert downstream_loss(z, t, "softmax_ce").item() == pytest.approx(softmax_ce.item(), rel=1e-12)
    assert downstream_loss(z, t, "bce").item() == pytest.approx(bce.item(), rel=1e-12)
    y = torch.tensor([4, 0, 1, 2, 3, 19])  # class indices: plain cross-entropy whatever multilabel_loss says
    ce = -log_softmax[torch.arange(6), y].mean()
    for how in ("softmax_ce", "bce"):
        assert downstream_loss(z, y, how).item() == pytest.approx(ce.item(), rel=1e-12)
    with pytest.raises(ValueError, match="multilabel_loss='hinge'"):
        downstream_loss(z, t, "hinge")


# ---- the dataset ----------------------------------------------------------------------------------------

def test_voc07_reads_the_official_lists_as_multi_hot_labels_with_the_difficult_mask(tmp_path):
    written = write_voc2007(tmp_path)
    info = data.DATASETS["voc07"]
    assert (info.kind, info.num_classes, info.multilabel) == ("paper", 20, True)
    for split in data.SPLITS:
        d = load_downstream("voc07", split, root=tmp_path, search=[], image_size=16, download=False)
        labels, difficult, shades = written[split]
        assert d.multilabel and d.labels.dtype == torch.float32
        assert np.array_equal(d.labels.numpy(), labels) and np.array_equal(d.difficult.numpy(), difficult)
        image, label = d[0]
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and torch.equal(label, d.labels[0])
        m = d.materialize()
        assert torch.equal(m.difficult, d.difficult) and m.images.shape == (len(labels), 3, 16, 16)
        # every image is the one its annotation was written for (JPEG moves the shade a little)
        assert all(abs(m.images[i].float().mean().item() - shade(shades[i])) < 4 for i in range(len(labels)))
    assert written["train"][1].any()  # the fake has difficult-only classes, so the mask is exercised


def test_voc07_absent_names_its_layout_and_few_label_is_refused(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_downstream("voc07", "train", root=tmp_path, search=[], download=False)
    assert err.value.args[0].startswith("voc07: ") and data.DATASETS["voc07"].layout in str(err.value)
    assert "VOCdevkit/VOC2007/{JPEGImages" in data.DATASETS["voc07"].layout
    write_voc2007(tmp_path)
    from bissl_kit.config import ConfigError
    with pytest.raises(ConfigError, match="multi-label"):
        load_downstream("voc07", "train", root=tmp_path, search=[], labels_per_class=2, download=False)


# ---- end to end through the command line ------------------------------------------------------------------

@pytest.fixture(scope="module")
def voc_chain(tmp_path_factory):
    """A fake VOC2007, a 2-step pre-training on a folder of images and a 2-stage BiSSL run on voc07, via the CLI."""
    import json
    from bissl_kit.__main__ import main
    from fake_datasets import write_image_folder
    root = tmp_path_factory.mktemp("voc_chain")
    write_voc2007(root / "voc", {"train": 12, "val": 10, "test": 8})
    write_image_folder(root / "pics", n=16)
    for part, n in (("train/a", 4), ("train/b", 4), ("test/a", 2)):
        write_image_folder(root / "task" / part, n=n, side=16)
    common = ["--device", "cpu", "--progress", "false"]
    assert main(["pretrain", "--pretext-dataset", f"{root}/pics/", "--eval-dataset", f"{root}/task", "--image-size", "16",
                 "--width", "4", "--proj-hidden", "16", "--proj-dim", "8", "--steps", "2", "--batch-size", "8",
                 "--warmup-steps", "1", "--knn-every", "0", "--knn-k", "3", "--loader-workers", "1",
                 "--out-dir", f"{root}/runs/pre", *common]) == 0
    voc = ["--downstream", "voc07", "--data-root", str(root / "voc")]
    assert main(["bissl", "--pretrain-checkpoint", f"{root}/runs/pre/checkpoint.pt", *voc, "--stages", "2",
                 "--lower-steps", "1", "--upper-steps", "1", "--lower-batch-size", "8", "--upper-batch-size", "4",
                 "--head-warmup-epochs", "1", "--loader-workers", "1", "--out-dir", f"{root}/runs/bissl", *common]) == 0
    stages = [json.loads(line) for line in (root / "runs/bissl/metrics.jsonl").read_text().splitlines()]
    return root, voc, common, [r for r in stages if r.get("kind") == "stage"]


def test_voc07_runs_bissl_and_finetune_from_the_cli_and_reports_map(voc_chain, capsys):
    import json
    from bissl_kit.__main__ import main
    root, voc, common, stages = voc_chain
    assert [r["stage"] for r in stages] == [0, 1, 2] and all(0 < r["val_map"] <= 1 and "val_top1" not in r for r in stages)
    for loss in ("softmax_ce", "bce"):
        assert main(["finetune", "--backbone-checkpoint", f"{root}/runs/bissl/checkpoint.pt", *voc, "--epochs", "2",
                     "--batch-size", "4", "--select", "best_val", "--multilabel-loss", loss,
                     "--out-dir", f"{root}/runs/ft_{loss}", *common]) == 0
        out = capsys.readouterr().out
        assert "val mAP" in out and "test mAP" in out and "top-1" not in out
        final = [json.loads(line) for line in (root / f"runs/ft_{loss}/metrics.jsonl").read_text().splitlines()][-1]
        assert final["kind"] == "final" and 0 < final["test_map"] <= 1 and final["n_test"] == 8
        assert final["best_val_map"] >= final["val_map"] and "11-point" in final["test_protocol"]
        assert f"multilabel_loss={loss}" in final["test_protocol"]
    # the two losses train different models from the same seed
    finals = [json.loads((root / f"runs/ft_{h}/metrics.jsonl").read_text().splitlines()[-1]) for h in ("softmax_ce", "bce")]
    assert finals[0]["val_loss"] != finals[1]["val_loss"]
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--backbone-checkpoint", f"{root}/runs/bissl/checkpoint.pt", *voc, "--multilabel-loss", "hinge",
              "--out-dir", f"{root}/runs/bad", *common])
    assert exit_.value.code == 2
    assert "multilabel_loss" in capsys.readouterr().err and not (root / "runs/bad").exists()


@pytest.mark.slow
def test_voc07_comparison_searches_on_val_map_and_tables_test_map(voc_chain):
    import json
    from bissl_kit.__main__ import main
    root, voc, common, _ = voc_chain
    assert main(["compare", "--pretrain-checkpoint", f"{root}/runs/pre/checkpoint.pt", "--tasks", "voc07", "--data-root",
                 str(root / "voc"), "--bissl-runs", f"{root}/runs/bissl", "--trials", "1", "--seeds", "1", "--epochs", "1",
                 "--batch-size", "4", "--probe", "false", "--out-dir", f"{root}/runs/cmp", *common]) == 0
    results = json.loads((root / "runs/cmp/comparison.json").read_text())
    arms = results["tasks"][0]["arms"]
    assert all(0 < a["test_map"]["mean"] <= 1 and "test_top1" not in a and a["frozen"]["knn"] is None for a in arms.values())
    assert all("multi-label" in a["frozen"]["knn_protocol"] for a in arms.values())
    table = (root / "runs/cmp/comparison.md").read_text()
    assert " mAP |" in table and "selected on val mAP" in table
