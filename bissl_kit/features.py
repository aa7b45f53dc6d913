"""Feature analysis: the backbone's downstream features at every point of the pipeline (notebook 04).

The paper's second claim is qualitative: BiSSL "enhances the alignment of downstream features in the
backbone prior to fine-tuning" (spec §5; no public code exists for it). This module makes the claim
inspectable (UMAP pictures) and measurable (numbers beside them):

* **stages**: the same architecture at random initialisation, after pre-training, after BiSSL (the lower
  backbone θ_P, which is handed on to fine-tuning, and the upper backbone θ_D), and after fine-tuning.
  Each stage is read from its checkpoint by one loader in :data:`LOADERS`.
* **numbers** per stage, each with its protocol string: weighted k-NN and linear-probe accuracy (train
  split → the eval split) and the **silhouette** of the true classes in feature space (cosine distance):
  for an image, a = mean distance to its own class, b = mean distance to the nearest other class,
  s = (b − a)/max(a, b); +1 = tight, well-separated classes, 0 = overlapping, < 0 = closer to another class.
* **pictures**: a 2-D UMAP of the eval-split features per stage. UMAP axes have no units and distances
  across clusters mean little; only the numbers above are measurements.

How the panels are made comparable (``umap_fit``):

* ``"aligned"`` (default): one UMAP per stage, fitted on that stage's features alone (same
  hyper-parameters and seed), then rotated/reflected/scaled/shifted (orthogonal Procrustes, which cannot
  bend the picture) so that the same images land as close as possible to where they are in the
  reference stage's panel. Each panel is then faithful to its own feature space and the panels share
  orientation and scale, so the reader can follow a class from panel to panel.
* ``"pooled"``: one reducer fitted on the features of all stages stacked. Features of different networks
  are far apart, so the neighbour graph mostly links images *within* a stage and each stage becomes its
  own island somewhere in the plane: the axes are shared, but positions across stages are not comparable.
* ``"reference"``: fit on the reference stage, ``transform`` the others: every stage is placed by its
  nearest neighbours among the *reference's* features, i.e. measured in another network's coordinates,
  which means nothing for random init or fine-tuned backbones.

The default is "aligned" for these reasons; the other two exist so the difference can be seen.

This module measures and embeds (UMAP is imported only when an embedding is fitted); the panels, the
number charts, the thumbnails and the interactive explorer are drawn by :mod:`bissl_kit.viz.features`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import data as data_mod
from .backbones import load_backbone
from .checkpoint import CheckpointError
from .config import DEVICE_RULE, Config, ConfigError, check_device, param
from .evaluate import evaluate_frozen

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
    pretrain_checkpoint: str | None = param(None, "pre-training checkpoint; None = <runs_dir>/pretrain/checkpoint.pt if it exists")
    bissl_checkpoint: str | None = param(None, "BiSSL checkpoint (θ_P and θ_D); None = <runs_dir>/bissl/checkpoint.pt if it exists")
    finetune_checkpoints: tuple[str, ...] | None = param(None, "fine-tuning checkpoints (any number); None = "
                                                         "<runs_dir>/finetune/checkpoint.pt if it exists")
    stages: tuple[str, ...] = param(STAGE_KINDS, f"stages to show, in this order; each one of {', '.join(STAGE_KINDS)}")
    # Data
    downstream: str | None = param(None, "downstream dataset; None = the BiSSL run's (else a fine-tuning run's, else digits)")
    labels_per_class: int | None = param(None, "few-label train split for k-NN and probe (with downstream set); None = all", low=1)
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
        if self.downstream is not None and self.downstream not in data_mod.DATASETS:
            raise ConfigError(f"downstream={self.downstream!r} must be None or one of {', '.join(data_mod.DATASETS)}")
        if self.labels_per_class is not None and self.downstream is None:
            raise ConfigError("labels_per_class needs downstream to be set too (None takes both from the runs)")


# ---- loading the backbone of each stage ----------------------------------------------------------------

@dataclass
class Stage:
    """One point of the pipeline: a backbone (eval mode), its label and where it came from."""
    key: str          # unique: "random", "pretrained", "bissl_lower", "bissl_upper", "finetuned_<source>"
    kind: str         # one of STAGE_KINDS
    label: str        # for legends and tables
    backbone: nn.Module
    pre_cfg: object   # the PretrainConfig that describes the architecture and image size
    source: str       # provenance, printed beside the numbers
    task: tuple[str, int | None] | None = None  # (downstream, labels_per_class) the stage was trained on, if any


FINETUNE_SOURCES = {"pretrained": ("baseline", "fine-tuned (baseline)"),
                    "matched": ("matched", "fine-tuned (matched baseline)"),
                    "bissl": ("bissl", "fine-tuned (BiSSL)")}


def _finetuned_from(source: dict) -> str:
    """'pretrained', 'matched' (a continued pre-training run) or 'bissl': what a fine-tuned run started as."""
    if source.get("kind") == "pretext_matched" or source.get("continued_from") is not None:
        return "matched"
    return {"pretrain": "pretrained"}.get(source.get("kind"), source.get("kind", "?"))


def load_stage(path, kind: str) -> Stage:
    """The backbone of one checkpoint-backed stage kind (``pretrained``, ``bissl_lower``, ``bissl_upper``,
    ``finetuned``), with its label and provenance, read once."""
    # each role belongs to one checkpoint kind, so a checkpoint of another kind is refused by its role
    role = {"pretrained": "pretrained", "bissl_lower": "lower", "bissl_upper": "upper", "finetuned": "finetuned"}[kind]
    loaded = load_backbone(path, role)
    c, n, pre = loaded.config, loaded.step, loaded.pretrain_config
    if kind == "pretrained":
        return Stage("pretrained", "pretrained", "pre-trained", loaded.backbone, pre,
                     f"{path} ({pre.method}, {n} steps)")
    if kind in ("bissl_lower", "bissl_upper"):
        text = (f"{path} ({n} stage{'' if n == 1 else 's'} of N_L {c['lower_steps']} / N_U {c['upper_steps']}, "
                f"γ {c['gamma']:g})")
        label = "BiSSL θ_P (lower)" if kind == "bissl_lower" else "BiSSL θ_D (upper)"
        return Stage(kind, kind, label, loaded.backbone, pre, text, (c["downstream"], c.get("labels_per_class")))
    # finetuned: the reported model's backbone, labelled by the checkpoint the run started from
    origin = _finetuned_from(loaded.lineage.get("init") or {})
    short, label = FINETUNE_SOURCES.get(origin, (origin, f"fine-tuned ({origin})"))
    return Stage(f"finetuned_{short}", "finetuned", label, loaded.backbone, pre,
                 f"{path} ({c['epochs']} epochs, lr {c['lr']:g}, wd {c['weight_decay']:g}, from a {origin} checkpoint)",
                 (c["downstream"], c.get("labels_per_class")))


def random_init_backbone(pre_cfg, in_channels: int) -> Stage:
    """The backbone at step 0 of the pre-training run (same seed, same initialisation): the control."""
    from .pretrain import build_model
    backbone = build_model(pre_cfg, in_channels).backbone
    return Stage("random", "random", "random init", backbone.eval(), pre_cfg,
                 f"initialisation of seed {pre_cfg.seed} (step 0 of pre-training)")


def _checkpoint_paths(cfg: FeaturesConfig) -> dict[str, list[tuple[str, bool]]]:
    """Per stage kind, the checkpoint paths to read and whether each was named explicitly."""
    runs = Path(cfg.runs_dir)

    def one(explicit, default):
        return [(explicit, True)] if explicit is not None else [(str(default), False)]

    fts = ([(p, True) for p in cfg.finetune_checkpoints] if cfg.finetune_checkpoints is not None
           else [(str(runs / "finetune" / "checkpoint.pt"), False)])
    bissl = one(cfg.bissl_checkpoint, runs / "bissl" / "checkpoint.pt")
    return {"pretrained": one(cfg.pretrain_checkpoint, runs / "pretrain" / "checkpoint.pt"),
            "bissl_lower": bissl, "bissl_upper": bissl, "finetuned": fts}


def _same_architecture(a, b) -> bool:
    keys = ("arch", "width", "small_stem", "image_size", "paper_augment")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _lineage_differences(a, b) -> str:
    """The pre-training settings (other than bookkeeping such as out_dir) in which two configs differ."""
    from .pretrain import PretrainConfig, as_run
    skip = PretrainConfig.resumable_fields()
    da, db = as_run(a.to_dict()), as_run(b.to_dict())
    return "; ".join(f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if k not in skip and da[k] != db.get(k))


def collect_stages(cfg: FeaturesConfig, *, log=print) -> tuple[list[Stage], list[str]]:
    """The stages of ``cfg.stages`` that exist, in order, and the notes about those skipped.

    A checkpoint at its default place that is missing is skipped with a note; one named in the config
    that is missing (or unreadable, or for another architecture or task) is an error. Random init needs
    the architecture of some other stage (preferably the pre-training run's)."""
    paths = _checkpoint_paths(cfg)
    loaded: dict[str, list[Stage]] = {}
    notes: list[str] = []
    for kind in cfg.stages:
        if kind == "random":
            continue
        for path, explicit in paths[kind]:
            if not Path(path).is_file():
                if explicit:
                    field_name = {"pretrained": "pretrain_checkpoint", "finetuned": "finetune_checkpoints"}.get(
                        kind, "bissl_checkpoint")
                    raise CheckpointError(f"{field_name}: checkpoint {path!r} (stage {kind!r}) does not exist")
                notes.append(f"skipped {kind!r}: no checkpoint at {path} (run the notebook that makes it, "
                             "or name the file in the parameters)")
                continue
            loaded.setdefault(kind, []).append(load_stage(path, kind))
    found = [s for kind in cfg.stages for s in loaded.get(kind, [])]
    reference = (loaded.get("pretrained") or found or [None])[0]
    if reference is None:
        raise CheckpointError("no checkpoint found for any stage of " + ", ".join(cfg.stages) +
                              f" (looked under runs_dir={cfg.runs_dir!r}); run notebooks 01–03 first or name "
                              "the checkpoints in the parameters")
    kept = []
    for s in found:
        if not _same_architecture(s.pre_cfg, reference.pre_cfg):
            msg = (f"stage {s.label!r} ({s.source}) has another architecture or image size than "
                   f"{reference.label!r}; the panels must show one architecture")
            if any(explicit for _, explicit in paths[s.kind]):
                raise CheckpointError(msg)
            notes.append("skipped: " + msg)
            continue
        differs = _lineage_differences(s.pre_cfg, reference.pre_cfg)
        if s is not reference and differs:
            notes.append(f"note: {s.label!r} descends from a pre-training run with other settings than "
                         f"{reference.label!r} ({differs}); the two are not one pipeline")
        kept.append(s)
    stages = []
    for kind in cfg.stages:
        if kind == "random":
            stages.append(random_init_backbone(reference.pre_cfg, reference.backbone.in_channels))
        stages.extend(s for s in kept if s.kind == kind)
    # unique keys (several fine-tuned runs from the same source kind)
    seen: dict[str, int] = {}
    for s in stages:
        n = seen.get(s.key, 0)
        seen[s.key] = n + 1
        if n:
            s.key, s.label = f"{s.key}_{n + 1}", f"{s.label} #{n + 1}"
    for note in notes:
        log(note)
    return stages, notes


def resolve_task(cfg: FeaturesConfig, stages: list[Stage], *, log=print) -> tuple[str, int | None]:
    """The downstream task: the config's, else the first BiSSL or fine-tuned stage's, else digits. A
    stage trained on another task is kept (its features are still measured on this task) with a note."""
    task = ((cfg.downstream, cfg.labels_per_class) if cfg.downstream is not None
            else next((s.task for s in stages if s.task is not None), ("digits", None)))
    for s in stages:
        if s.task is not None and s.task[0] != task[0]:
            log(f"note: {s.label!r} was trained on {s.task[0]!r}; its features are measured on {task[0]!r}")
    return task


# ---- data and features -----------------------------------------------------------------------------------

@dataclass
class TaskData:
    name: str
    labels_per_class: int | None
    split: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    eval_source_index: np.ndarray  # position of each eval image in the source dataset (provenance)
    num_classes: int
    mean: tuple
    std: tuple

    @property
    def task(self) -> str:
        return self.name if self.labels_per_class is None else f"{self.name}:{self.labels_per_class}"

    def class_names(self) -> list[str]:
        if self.name == "fashion_mnist":
            return list(FASHION_MNIST_CLASSES)
        return [str(c) for c in range(self.num_classes)]


def load_task(name: str, labels_per_class: int | None, split: str, pre_cfg, *, data_root=None) -> TaskData:
    """Train split (k-NN/probe memory) and eval split at the pre-training image size, with its normalisation."""
    from .pretrain import pretext_view_specs

    size = pre_cfg.image_size
    train = data_mod.load_downstream(name, "train", root=data_root, image_size=size,
                                     labels_per_class=labels_per_class).materialize()
    ev = data_mod.load_downstream(name, split, root=data_root, image_size=size).materialize()
    view = pretext_view_specs(pre_cfg, train.images.shape[1])[0]
    return TaskData(name, labels_per_class, split, train.images, train.labels, ev.images, ev.labels,
                    np.asarray(ev.indices), train.num_classes, view.mean, view.std)


# ---- UMAP and alignment ---------------------------------------------------------------------------------------

def procrustes_align(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``x`` rotated or reflected (the orthogonal Procrustes solution R), rescaled to the spread of
    ``ref`` and shifted onto its centre, so that the same rows of both lie as close as possible. Only
    a similarity transform: the picture is never bent. The scale is *not* the least-squares one, which
    shrinks a panel towards its centre the less it resembles the reference; here every panel keeps the
    reference's root-mean-square spread."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    xc, rc = x - x.mean(0), ref - ref.mean(0)
    u, _, vt = np.linalg.svd(xc.T @ rc)
    scale = math.sqrt((rc ** 2).sum() / max((xc ** 2).sum(), 1e-300))
    return scale * xc @ (u @ vt) + ref.mean(0)


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``n`` samples, the same share of every class, drawn with ``seed``."""
    y = labels.numpy()
    if len(y) <= n:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.append(rng.permutation(idx)[:max(1, round(n * len(idx) / len(y)))])
    return np.sort(np.concatenate(keep))


def _reducer(cfg: FeaturesConfig, n: int):
    import umap  # ~10 s of numba compilation on the first fit of a process

    return umap.UMAP(n_neighbors=min(cfg.n_neighbors, n - 1), min_dist=cfg.min_dist, metric=cfg.metric,
                     random_state=cfg.seed, n_components=2, n_jobs=1)  # seeded UMAP is single-threaded anyway


def umap_embeddings(feats: dict[str, np.ndarray], cfg: FeaturesConfig, reference: str) -> dict[str, np.ndarray]:
    """A 2-D embedding per stage (same images, same order), made comparable as ``cfg.umap_fit`` says
    (module docstring). Deterministic for a given ``cfg.seed`` (``random_state`` runs UMAP single-threaded)."""
    keys = list(feats)
    n = len(next(iter(feats.values())))
    if cfg.umap_fit == "pooled":
        pooled = _reducer(cfg, n * len(keys)).fit_transform(np.concatenate([feats[k] for k in keys]))
        return {k: pooled[i * n:(i + 1) * n] for i, k in enumerate(keys)}
    if cfg.umap_fit == "reference":
        reducer = _reducer(cfg, n).fit(feats[reference])
        return {k: (reducer.embedding_ if k == reference else reducer.transform(feats[k])) for k in keys}
    out = {k: _reducer(cfg, n).fit_transform(feats[k]) for k in keys}
    return {k: (v if k == reference else procrustes_align(v, out[reference])) for k, v in out.items()}


# ---- the analysis ---------------------------------------------------------------------------------------------

@dataclass
class StageResult:
    key: str
    label: str
    source: str
    knn: float
    probe: float
    silhouette: float
    knn_correct: np.ndarray      # per eval image
    knn_pred: np.ndarray         # per eval image
    silhouette_per_image: np.ndarray
    features: np.ndarray | None = None   # (pictured images) × feat_dim
    embedding: np.ndarray | None = None  # (pictured images) × 2


@dataclass
class FeatureAnalysis:
    cfg: FeaturesConfig
    data: TaskData
    stages: list[StageResult]
    protocols: dict[str, str]     # "knn", "probe", "silhouette", "umap"
    pictured: np.ndarray          # indices into the eval split of the pictured images
    reference: str
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def stage(self, key: str) -> StageResult:
        return next(s for s in self.stages if s.key == key)

    def rows(self) -> list[dict]:
        return [{"stage": s.label, "k-NN": s.knn, "linear probe": s.probe, "silhouette": s.silhouette,
                 "checkpoint": s.source} for s in self.stages]

    def protocol_text(self) -> str:
        d = self.data
        return "\n".join([f"task: {d.task}, train → {d.split} ({len(d.train_labels)} → {len(d.eval_labels)} images)",
                          f"features: {self.protocols['bn']}",
                          f"k-NN: {self.protocols['knn']}", f"probe: {self.protocols['probe']}",
                          f"separability: {self.protocols['silhouette']}", f"pictures: {self.protocols['umap']}"])


def analyse(cfg: FeaturesConfig, *, log=print) -> FeatureAnalysis:
    """Load every stage that exists, extract features, compute the numbers (:func:`measure`) and the
    UMAP pictures (:func:`embed`)."""
    return embed(measure(cfg, log=log))


def measure(cfg: FeaturesConfig, *, log=print) -> FeatureAnalysis:
    """Every stage's features and numbers; the pictured images' features are kept for :func:`embed`."""
    t0 = time.perf_counter()
    stages, notes = collect_stages(cfg, log=log)
    name, lpc = resolve_task(cfg, stages, log=log)
    data = load_task(name, lpc, cfg.split, stages[0].pre_cfg, data_root=cfg.data_root)
    seconds = {"load": time.perf_counter() - t0}
    device = torch.device(cfg.device)

    t0 = time.perf_counter()
    results, protocols = [], {}
    pictured = stratified_subset(data.eval_labels, cfg.max_points, cfg.seed)
    from .pretrain import KNN_BN_PROTOCOLS, knn_bn_images
    bn_images = None
    if cfg.bn == "pretext":
        pre = stages[0].pre_cfg
        bn_images = knn_bn_images(data_mod.load_pretext(pre.pretext_dataset, root=cfg.data_root,
                                                        image_size=pre.image_size))
    protocols["bn"] = KNN_BN_PROTOCOLS[cfg.bn]
    probe = dict(epochs=cfg.probe_epochs, lr=cfg.probe_lr, weight_decay=cfg.probe_weight_decay)
    for st in stages:
        res = evaluate_frozen(st.backbone.to(device), (data.train_images, data.train_labels),
                              (data.eval_images, data.eval_labels), mean=data.mean, std=data.std,
                              num_classes=data.num_classes, bn_images=bn_images, bn=KNN_BN_PROTOCOLS[cfg.bn],
                              knn_k=cfg.knn_k, knn_temperature=cfg.knn_temperature, probe=probe,
                              silhouette=cfg.metric, keep_features=True, seed=cfg.seed, device=device)
        protocols.update(knn=res.knn.protocol(), probe=res.probe.protocol(), silhouette=res.silhouette.protocol())
        pred = res.knn_predictions
        results.append(StageResult(st.key, st.label, st.source, res.knn.accuracy, res.probe.accuracy,
                                   res.silhouette.silhouette, (pred == data.eval_labels).numpy(), pred.numpy(),
                                   res.silhouette_samples.numpy(), features=res.eval_features[pictured].numpy()))
    seconds["features and numbers"] = time.perf_counter() - t0
    reference = next((s.key for s in stages if s.kind == cfg.reference_stage), stages[0].key)
    return FeatureAnalysis(cfg, data, results, protocols, pictured, reference, notes, seconds)


def embed(analysis: FeatureAnalysis) -> FeatureAnalysis:
    """Fill in each stage's 2-D UMAP embedding of the pictured images (and the pictures' protocol)."""
    cfg = analysis.cfg
    t0 = time.perf_counter()
    emb = umap_embeddings({r.key: r.features for r in analysis.stages}, cfg, analysis.reference)
    for r in analysis.stages:
        r.embedding = emb[r.key]
    analysis.seconds["umap"] = time.perf_counter() - t0
    ref_label = analysis.stage(analysis.reference).label
    how = {"aligned": f"one UMAP per stage, Procrustes-aligned to {ref_label!r}",
           "pooled": "one UMAP fitted on all stages' features stacked (positions not comparable across stages)",
           "reference": f"UMAP fitted on {ref_label!r}, the other stages transformed into it"}[cfg.umap_fit]
    analysis.protocols["umap"] = (f"{how}; n_neighbors={cfg.n_neighbors}, min_dist={cfg.min_dist:g}, "
                                  f"metric={cfg.metric}, seed={cfg.seed}; {len(analysis.pictured)} "
                                  f"{analysis.data.split} images")
    return analysis


def changed_predictions(analysis: FeatureAnalysis, before: str, after: str) -> tuple[list[int], list[int]]:
    """Eval images the k-NN gets wrong at ``before`` and right at ``after`` (fixed), and the reverse (broken)."""
    a, b = analysis.stage(before).knn_correct, analysis.stage(after).knn_correct
    return np.flatnonzero(~a & b).tolist(), np.flatnonzero(a & ~b).tolist()
