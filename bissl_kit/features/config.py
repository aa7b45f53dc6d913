"""The feature analysis's one config: which checkpoints, which task, how the pictures are fitted."""

from __future__ import annotations

from dataclasses import dataclass

from .. import data as data_mod
from ..config import DEVICE_RULE, Config, ConfigError, check_device, param

STAGE_KINDS = ("random", "pretrained", "bissl_lower", "bissl_upper", "finetuned")
UMAP_FITS = ("aligned", "pooled", "reference")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


@dataclass(frozen=True)
class FeaturesConfig(Config):
    # Which checkpoints. None = "whatever exists" at the usual place under runs_dir (skipped with a note
    # when missing); a path given here must exist.
    runs_dir: str = param("runs", "where missing checkpoint paths are looked for: <runs_dir>/pretrain, "
                          "<runs_dir>/bissl, <runs_dir>/finetune (each <...>/checkpoint.pt)")
    pretrain_checkpoint: str | None = param(None, "pre-training checkpoint; None = <runs_dir>/pretrain/checkpoint.pt "
                                                "if it exists")
    bissl_checkpoint: str | None = param(None, "BiSSL checkpoint (θ_P and θ_D); None = <runs_dir>/bissl/checkpoint.pt "
                                             "if it exists")
    finetune_checkpoints: tuple[str, ...] | None = param(None, "fine-tuning checkpoints (any number); None = "
                                                         "<runs_dir>/finetune/checkpoint.pt if it exists")
    stages: tuple[str, ...] = param(STAGE_KINDS, f"stages to show, in this order; each one of {', '.join(STAGE_KINDS)}")
    # Data
    downstream: str | None = param(None, "downstream dataset; None = the BiSSL run's (else a fine-tuning run's, else digits)")
    labels_per_class: int | None = param(None, "few-label train split for k-NN and probe (with downstream set); "
                                            "None = all", low=1)
    split: str = param("val", "images pictured and evaluated (the train split is the k-NN/probe's memory); "
                       "'test' only for final numbers", choices=("val", "test"))
    max_points: int = param(2000, "images of the eval split pictured (a seeded, class-stratified subset when "
                            "larger; the numbers use the whole split)", low=10)
    data_root: str | None = param(None, "dataset root; None searches $BISSL_DATA, data/, the Debian package")
    # UMAP
    umap_fit: str = param("aligned", "'aligned' (one UMAP per stage, Procrustes-aligned to the reference), "
                          "'pooled' (one reducer on all stages) or 'reference' (fit on the reference, transform the rest)",
                          choices=UMAP_FITS)
    reference_stage: str = param("pretrained", "stage the others are aligned to (falls back to the first stage shown)",
                                 choices=STAGE_KINDS)
    n_neighbors: int = param(15, "UMAP n_neighbors: size of the local neighbourhood", low=2)
    min_dist: float = param(0.1, "UMAP min_dist: how tightly points may pack", low=0, high=1)
    metric: str = param("cosine", "distance in feature space, for UMAP and the silhouette", choices=("cosine", "euclidean"))
    # Numbers (the k-NN and probe protocols of notebooks 01, 03 and 05)
    knn_k: int = param(20, "neighbours of the weighted k-NN", low=1)
    knn_temperature: float = param(0.07, "temperature of the weighted k-NN vote", low=0, low_inclusive=False)
    probe_epochs: int = param(100, "linear-probe epochs", low=1)
    probe_lr: float = param(0.1, "linear-probe SGD learning rate", low=0, low_inclusive=False)
    probe_weight_decay: float = param(0.0, "linear-probe weight decay", low=0)
    bn: str = param("pretext", "BatchNorm statistics of every stage's features: 'pretext' = re-estimated on a copy "
                    "over 5,120 fixed un-augmented pretext images (notebook 01's k-NN protocol; the same for every "
                    "stage), 'running' = as each checkpoint holds them (a random init's are the identity)",
                    choices=("pretext", "running"))
    # Running
    seed: int = param(0, "seed of UMAP, the probe and the pictured subset", low=0)
    device: str = param("cpu", f"where features are extracted: {DEVICE_RULE}", check=check_device)

    def check(self):
        bad = [s for s in self.stages if s not in STAGE_KINDS]
        if bad or not self.stages or len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"stages={self.stages!r}: each must be one of {', '.join(STAGE_KINDS)}, "
                              "at least one, none twice")
        if self.downstream is not None:
            data_mod.check_dataset_name("downstream", self.downstream)
        if self.labels_per_class is not None and self.downstream is None:
            raise ConfigError("labels_per_class needs downstream to be set too (None takes both from the runs)")
