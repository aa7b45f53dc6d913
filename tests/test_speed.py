"""Speed options (bissl_kit.speed): off, a step is the plain computation bit for bit; bf16 and channels-last on a
CPU stay close to it; in the BiSSL stage only channels-last is valid."""
import copy

import pytest
import torch

from bissl_kit.augment import two_views
from bissl_kit.bissl import BisslConfig, build_trainer
from bissl_kit.config import ConfigError
from bissl_kit.finetune import FinetuneConfig, Finetuner
from bissl_kit.optim import LARS, set_lr, warmup_cosine
from bissl_kit.pretrain import PretrainConfig, Pretrainer
from bissl_kit.rng import generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(out_dir, **speed) -> PretrainConfig:
    return PretrainConfig(steps=2, batch_size=16, warmup_steps=1, width=4, proj_hidden=16, proj_dim=8, image_size=8,
                          knn_every=0, eval_labels_per_class=2, checkpoint_every=2, progress=False, device="cpu",
                          out_dir=str(out_dir), **speed)


def params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_with_the_options_off_a_pretraining_step_is_the_plain_computation(tmp_path):
    trainer = Pretrainer(tiny(tmp_path / "run"))
    cfg = trainer.cfg
    model = copy.deepcopy(trainer.model)  # the same initialisation, stepped by hand below
    opt = LARS(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    for step in range(2):
        set_lr(opt, warmup_cosine(step, base_lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps))
        v1, v2 = two_views(trainer.batch(step), *trainer.view_specs, generator(cfg.seed, "pretext-views", step))
        loss = model.loss(v1, v2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_target()
        rec = trainer.train_step(step)
        assert rec["loss"] == loss.item()
        assert all(torch.equal(a, b) for a, b in zip(params(trainer.model), params(model)))
    trainer.run_dir.close()


def _two_steps(cfg) -> tuple[list[float], list[torch.Tensor]]:
    trainer = Pretrainer(cfg)
    losses = [trainer.train_step(s)["loss"] for s in range(2)]
    trainer.run_dir.close()
    return losses, params(trainer.model.backbone)


@pytest.mark.parametrize("option, tol", [("channels_last", 1e-4), ("bf16", 6e-2)])
def test_bf16_and_channels_last_pretraining_stays_close_on_a_cpu(tmp_path, option, tol):
    # a small lr: at the default 1.2 one LARS step of a width-4 network amplifies any rounding difference
    ref_losses, ref = _two_steps(tiny(tmp_path / "off", lr=0.05))
    losses, got = _two_steps(tiny(tmp_path / option, lr=0.05, **{option: True}))
    # bf16: 8 mantissa bits in the embeddings, whose dot products NT-Xent divides by τ = 0.2
    assert losses == pytest.approx(ref_losses, rel=tol)
    # the backbone as a whole (a single near-zero BatchNorm bias, which LARS steps by its trust ratio, would
    # make a per-tensor ratio meaningless)
    got, ref = torch.cat([p.reshape(-1) for p in got]), torch.cat([p.reshape(-1) for p in ref])
    assert ((got - ref).norm() / ref.norm()).item() < tol
    assert option != "bf16" or losses != ref_losses  # bf16 did run: the numbers moved, a little


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    trainer = Pretrainer(tiny(root / "pre"))
    for _ in trainer.run():
        pass
    return root / "pre" / "checkpoint.pt"


def _finetune_losses(path, out_dir, **speed) -> list[float]:
    cfg = FinetuneConfig(backbone_checkpoint=str(path), epochs=1, batch_size=32, labels_per_class=8, test=False,
                         progress=False, device="cpu", out_dir=str(out_dir), **speed)
    tuner = Finetuner(cfg)
    losses = [r["loss"] for r in tuner.train_epoch(0)]
    tuner.run_dir.close()
    return losses


def test_fine_tuning_with_bf16_and_channels_last_stays_close(pretrained, tmp_path):
    ref = _finetune_losses(pretrained, tmp_path / "off")
    assert _finetune_losses(pretrained, tmp_path / "again") == ref  # off: the same numbers each time
    assert _finetune_losses(pretrained, tmp_path / "cl", channels_last=True) == pytest.approx(ref, rel=1e-4)
    assert _finetune_losses(pretrained, tmp_path / "bf16", bf16=True, channels_last=True) == pytest.approx(ref, rel=3e-2)


@pytest.mark.parametrize("option, why", [("bf16", "need float32"), ("compile", "double backward")])
def test_bissl_refuses_the_options_its_double_backward_cannot_take(option, why):
    with pytest.raises(ConfigError, match=f"{option}=True is not valid in the BiSSL stage: .*{why}"):
        BisslConfig.embedded(**{option: True})


def test_bissl_with_channels_last_stays_close(pretrained, tmp_path):
    def stage(out_dir, **speed):
        cfg = BisslConfig.embedded(pretrain_checkpoint=str(pretrained), stages=1, lower_steps=2, upper_steps=2,
                                   lower_batch_size=16, upper_batch_size=16, head_warmup_epochs=1, labels_per_class=8,
                                   solver_iters=2, progress=False, device="cpu", out_dir=str(out_dir), **speed)
        trainer = build_trainer(cfg)
        for _ in trainer.run():
            pass
        return params(trainer.lower.backbone)

    ref, got = stage(tmp_path / "off"), stage(tmp_path / "cl", channels_last=True)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert max(((a - b).norm() / b.norm()).item() for a, b in zip(got, ref)) < 1e-4
