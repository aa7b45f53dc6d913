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

Layout: :mod:`.config` (FeaturesConfig), :mod:`.stages` (the backbones and the task data),
:mod:`.embedding` (UMAP and Procrustes), :mod:`.analysis` (measure, embed, analyse).
"""

from .analysis import FeatureAnalysis, StageResult, analyse, changed_predictions, embed, measure
from .config import FASHION_MNIST_CLASSES, STAGE_KINDS, UMAP_FITS, FeaturesConfig
from .embedding import procrustes_align, stratified_subset, umap_embeddings
from .stages import (FINETUNE_SOURCES, Stage, TaskData, collect_stages, load_stage, load_task, random_init_backbone,
                     resolve_task)

__all__ = ["FASHION_MNIST_CLASSES", "FINETUNE_SOURCES", "STAGE_KINDS", "UMAP_FITS", "FeatureAnalysis", "FeaturesConfig",
           "Stage", "StageResult", "TaskData", "analyse", "changed_predictions", "collect_stages", "embed",
           "load_stage", "load_task", "measure", "procrustes_align", "random_init_backbone", "resolve_task",
           "stratified_subset", "umap_embeddings"]
