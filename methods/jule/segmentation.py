"""`jule`: JULE (Yang, Parikh & Batra, CVPR 2016) applied to segmentation.

The samples are superpixels, their representation is learned from the image(s) themselves,
and the recurrent agglomerative clustering of :mod:`methods.jule.core` (graph degree linkage
affinity, the paper's merge criterion, periods of ``unroll_rate``, weighted triplet loss)
builds the segmentation. Adaptations of the paper to regions (the paper clusters whole
images with a CNN trained from scratch):

- **Samples**: SLIC or Felzenszwalb superpixels (``n_superpixels``) of the image.
- **Representation** ``features="cnn"``: a small CNN over the CIELAB image at a working
  resolution (``cnn.max_side``), its output mean-pooled per superpixel (exactly, through a
  sparse pooling matrix), plus a learnable linear map of the superpixel's mean CIELAB colour.
  The CNN branch's last layer starts at zero, so the initial representation is the superpixel
  colour (orthonormally embedded, i.e. colour distances preserved) and learning adds
  texture/context; ``learn=false`` is then graph degree linkage on colour. A constant
  coordinate is appended before the L2 normalisation that JULE applies, so lightness is not
  normalised away. ``features="backbone"``: the lab's EfficientNet-Lite dense features
  (:class:`unsup.features.DenseFeatureExtractor`, frozen) pooled per superpixel, optionally
  with weighted colour appended, through a learnable residual MLP that starts as a rotation of
  its input (:func:`methods.jule.learning.residual_mlp`). See
  :mod:`methods.jule.representations`.
- **scope="image"** (per image, nothing to fit): merges are restricted to spatially adjacent
  clusters (``adjacency=True``; touching superpixels also join the affinity graph), so every
  cluster is connected and the dendrogram is a region hierarchy. After ``n_clusters`` is
  reached the merging continues (no more learning) down to one region, and the dendrogram
  gives the ultrametric contour map returned as ``Segmentation.hierarchy`` (the lab's uint16
  format: pixel ``p`` carries the boundary with its right and lower neighbours, value/65535 =
  the level in [0, 1] at which it disappears; levels from :meth:`Dendrogram.levels`;
  :mod:`methods.jule.regions`).
- **scope="dataset"**: ``fit`` streams the dataset and keeps ``samples_per_image`` random
  superpixels per image (patches for the CNN, pooled descriptors for the backbone), runs JULE
  over all of them (no adjacency), and stores the network and the cluster centroids;
  ``predict`` labels every superpixel of an image with its nearest centroid in the learned
  representation, so a label means the same cluster in every image.

Scores (for the dense CRF): ``softmax(-d^2 / (temperature * s))`` over the cluster centroids
of the L2-normalised superpixel embeddings (``s`` = the mean squared distance of the samples to
their own centroid), mapped to pixels through the superpixels.

JULE's own hyper-parameters (affinity, merge criterion, schedule, loss, optimiser) form the
nested option group ``learning`` (:class:`Learning`; ``--param learning__lr=1e-3``), those of
the from-scratch CNN the group ``cnn`` (:class:`CnnOptions`). Options tried and not adopted
(their results are in docs/benchmarks/jule.md) were removed after commit 208f86e.
"""

from __future__ import annotations

import contextlib

import numpy as np

from methods.jule.core import l2_normalize, run_jule
from methods.jule.learning import residual_mlp
from methods.jule.regions import (
    dendrogram_ucm,
    pixel_to_working,
    pooling_matrix,
    superpixel_adjacency,
    thicken_superpixels,
    working_shape,
)
from methods.jule.representations import (
    ImageCNNRepresentation,
    PatchCNNRepresentation,
    VectorRepresentation,
    build_color_cnn,
    cielab,
    resize,
    superpixel_patches,
)
from unsup.base import OptionGroup, Segmentation, SegmentationMethod, check_image
from unsup.registry import register
from unsup.superpixels import compute_superpixels, mean_per_segment

__all__ = ["Jule", "Learning", "CnnOptions", "dendrogram_ucm", "superpixel_adjacency",
           "thicken_superpixels"]

SCOPES = ("image", "dataset")
FEATURES = ("cnn", "backbone")
SUPERPIXELS = ("slic", "felzenszwalb")


class Learning(OptionGroup):
    """JULE's hyper-parameters of the recurrent process (the paper's names), for ``jule``.

    Parameters
    ----------
    unroll_rate : float
        ``eta``: each period merges ``ceil(eta * clusters)`` times (paper: 0.9; default 0.2,
        tuned on BSDS train: with ~100 initial clusters and 30 targets, 0.9 leaves a single
        period and so no learning at all).
    k_neighbors : int
        ``K_s`` of the affinity graph (paper: 20).
    affinity_a : float
        ``a`` of the graph bandwidth (paper: 1).
    k_clusters : int
        ``K_c`` (paper: 5).
    locality : float
        ``lambda`` (paper: 1).
    gamma, margin : float
        Weighted triplet loss (paper: gamma 2).
    n_iter_per_period : int
        Representation updates (minibatches) after each period.
    lr : float
        Learning rate (default 1e-4, tuned on BSDS train: 1e-3 degrades the representation).
    optimizer : {"adam", "sgd"}
        The paper uses SGD; Adam moves the zero-initialised branch faster (few iterations).
    batch_size : int
        Anchors per update.
    """

    def __init__(self, *, unroll_rate: float = 0.2, k_neighbors: int = 20,
                 affinity_a: float = 1.0, k_clusters: int = 5, locality: float = 1.0,
                 gamma: float = 2.0, margin: float = 0.2, n_iter_per_period: int = 30,
                 lr: float = 1e-4, optimizer: str = "adam", batch_size: int = 128):
        self.unroll_rate = unroll_rate
        self.k_neighbors = k_neighbors
        self.affinity_a = affinity_a
        self.k_clusters = k_clusters
        self.locality = locality
        self.gamma = gamma
        self.margin = margin
        self.n_iter_per_period = n_iter_per_period
        self.lr = lr
        self.optimizer = optimizer
        self.batch_size = batch_size


class CnnOptions(OptionGroup):
    """The from-scratch CNN of ``jule``'s ``features="cnn"`` (unused by the backbone features).

    Parameters
    ----------
    embedding_dim : int
        Width of the CNN and of its embedding.
    max_side : int
        Working resolution of the CNN (longer side).
    patch_size : int
        ``scope="dataset"``: side of the working-resolution patch stored around each sampled
        superpixel.
    freeze_color : bool
        Keep the colour map fixed (only the CNN branch learns), so learning can add texture
        but not distort colour distances.
    """

    def __init__(self, *, embedding_dim: int = 32, max_side: int = 240, patch_size: int = 32,
                 freeze_color: bool = False):
        self.embedding_dim = embedding_dim
        self.max_side = max_side
        self.patch_size = patch_size
        self.freeze_color = freeze_color


@contextlib.contextmanager
def _torch_threads(n: int | None):
    import torch

    if not n:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@register
class Jule(SegmentationMethod):
    """JULE-style recurrent agglomerative clustering of superpixels with joint learning.

    Parameters
    ----------
    scope : {"image", "dataset"}
        ``"image"``: each image on its own (nothing to fit). ``"dataset"``: fit on a folder,
        then label any image by nearest cluster centroid.
    n_clusters : int
        Clusters (labels) at which the learning process stops: regions per image
        (``scope="image"``) or clusters over the dataset. Tuning on BSDS500 train
        (docs/benchmarks/jule.md): Felzenszwalb superpixels with ``n_clusters=150`` score the
        best matched mIoU, but most images then have fewer initial clusters than that, so
        nothing is merged or learned (the output is the initial over-clustering) and covering
        drops; the default (SLIC, 30) keeps JULE's merging and learning, which give the better
        covering and beat the fixed-representation ablation.
    n_superpixels : int
        Approximate number of superpixels (SLIC ``n_segments``).
    superpixels : {"slic", "felzenszwalb"}
    compactness : float
        SLIC compactness.
    scale, min_size : float, int
        Felzenszwalb superpixels (scikit-image's ``scale`` and ``min_size``; ``sigma`` 0.8).
        The defaults give ~300-600 superpixels on a BSDS image, finer than the
        ``felzenszwalb`` method's segments (scale 300, min_size 200).
    features : {"backbone", "cnn"}
        Pretrained EfficientNet-Lite dense features with a learned head (the default), or a
        small CNN learned from the image(s) from scratch (the paper's setting, options in
        ``cnn``; see the module docstring). The default was chosen on BSDS500 train
        (mIoU(all) 0.234 vs 0.194, covering at ODS 0.580 vs 0.386, both with learning), and it
        learns ~10x faster on a CPU.
    backbone : str
        Backbone name for ``features="backbone"``.
    color_weight : float
        ``features="backbone"``: weight of the mean CIELAB colour (L/100, a/100, b/100)
        appended to the pooled backbone features (0 = backbone only).
    adjacency : bool
        ``scope="image"``: merge only spatially adjacent clusters.
    learn : bool
        Update the representation between periods (False = the fixed-representation ablation).
    learning : Learning or dict, optional
        JULE's hyper-parameters (:class:`Learning`; None = its defaults).
    cnn : CnnOptions or dict, optional
        ``features="cnn"``: the CNN's options (:class:`CnnOptions`; None = its defaults).
    samples_per_image : int
        ``scope="dataset"``: superpixels kept per image for fitting.
    max_images : int or None
        ``scope="dataset"``: fit on at most this many images (the first ones).
    ucm_levels : {"affinity", "rank"}
        How merge levels of the hierarchy are defined (:meth:`Dendrogram.levels`).
    temperature : float
        Score softmax temperature (relative to the mean within-cluster squared distance).
    n_threads : int or None
        torch intra-op threads during ``predict``/``fit`` (None = torch's default).
    seed : int
    """

    name = "jule"
    summary = ("JULE (Yang et al. 2016): recurrent agglomerative clustering of superpixels "
               "with joint representation learning; per image or over a dataset")
    supervision = "unlabeled"
    produces_scores = True

    def __init__(self, *, scope: str = "image", n_clusters: int = 30, n_superpixels: int = 400,
                 superpixels: str = "slic", compactness: float = 10.0, scale: float = 100.0,
                 min_size: int = 20, features: str = "backbone",
                 backbone: str = "efficientnet-lite0", color_weight: float = 0.5,
                 adjacency: bool = True, learn: bool = True, learning=None, cnn=None,
                 samples_per_image: int = 64, max_images: int | None = None,
                 ucm_levels: str = "affinity", temperature: float = 1.0,
                 n_threads: int | None = None, seed: int = 0):
        self.scope = scope
        self.n_clusters = n_clusters
        self.n_superpixels = n_superpixels
        self.superpixels = superpixels
        self.compactness = compactness
        self.scale = scale
        self.min_size = min_size
        self.features = features
        self.backbone = backbone
        self.color_weight = color_weight
        self.adjacency = adjacency
        self.learn = learn
        self.learning = Learning.coerce(learning, name="learning")
        self.cnn = CnnOptions.coerce(cnn, name="cnn")
        self.samples_per_image = samples_per_image
        self.max_images = max_images
        self.ucm_levels = ucm_levels
        self.temperature = temperature
        self.n_threads = n_threads
        self.seed = seed

    # -- configuration ---------------------------------------------------------------------
    @property
    def requires_fit(self) -> bool:
        return self.scope == "dataset"

    def _check_params(self) -> None:
        opts = self.learning
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {self.features!r}")
        if int(self.n_clusters) < 1:
            raise ValueError(f"n_clusters must be >= 1, got {self.n_clusters}")
        if self.superpixels not in SUPERPIXELS:
            raise ValueError(f"superpixels must be one of {SUPERPIXELS}, got "
                             f"{self.superpixels!r}")
        if int(self.n_superpixels) < 2:
            raise ValueError(f"n_superpixels must be >= 2, got {self.n_superpixels}")
        if not 0 < float(opts.unroll_rate) <= 1:
            raise ValueError(f"learning.unroll_rate must be in (0, 1], got {opts.unroll_rate}")
        if int(opts.k_neighbors) < 1:
            raise ValueError(f"learning.k_neighbors must be >= 1, got {opts.k_neighbors}")
        if int(opts.k_clusters) < 2:
            raise ValueError(f"learning.k_clusters must be >= 2, got {opts.k_clusters}")
        if self.ucm_levels not in ("affinity", "rank"):
            raise ValueError(f"ucm_levels must be 'affinity' or 'rank', got {self.ucm_levels!r}")
        if float(self.temperature) <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.scope == "dataset" and int(self.samples_per_image) < 1:
            raise ValueError(f"samples_per_image must be >= 1, got {self.samples_per_image}")

    def _jule_kwargs(self) -> dict:
        opts = self.learning
        return dict(unroll_rate=float(opts.unroll_rate), k_neighbors=int(opts.k_neighbors),
                    affinity_a=float(opts.affinity_a), k_clusters=int(opts.k_clusters),
                    locality=float(opts.locality), gamma=float(opts.gamma),
                    margin=float(opts.margin), learn=bool(self.learn),
                    n_iter_per_period=int(opts.n_iter_per_period), lr=float(opts.lr),
                    optimizer=opts.optimizer, batch_size=int(opts.batch_size),
                    weight_decay=0.0 if opts.optimizer == "adam" else 5e-4)

    def _superpixels(self, image):
        sp = compute_superpixels(image, method=self.superpixels,
                                 n_segments=int(self.n_superpixels),
                                 compactness=float(self.compactness),
                                 scale=float(self.scale), min_size=int(self.min_size))
        return thicken_superpixels(sp)

    def _extractor(self):
        from unsup.features import DenseFeatureExtractor

        if getattr(self, "_extractor_cache", None) is None:
            self._extractor_cache = DenseFeatureExtractor(self.backbone, output_stride=4)
        return self._extractor_cache

    def _backbone_descriptors(self, image, sp) -> np.ndarray:
        """Pooled backbone features (+ weighted colour) per superpixel, (n_sp, D)."""
        import torch

        dense = self._extractor()(image)
        feats = np.asarray(dense.features, dtype=np.float32)
        gh, gw, d = feats.shape
        pool = pooling_matrix(sp, dense.pixel_to_cell(), gh * gw)
        with torch.inference_mode():
            pooled = torch.sparse.mm(pool, torch.from_numpy(feats.reshape(-1, d))).numpy()
        parts = [pooled]
        if float(self.color_weight) > 0:
            parts.append(float(self.color_weight) * mean_per_segment(cielab(image), sp))
        return np.concatenate(parts, axis=1).astype(np.float32)

    def _new_module(self, in_dim: int | None = None):
        import torch

        torch.manual_seed(int(self.seed))
        if self.features == "cnn":
            module = build_color_cnn(int(self.cnn.embedding_dim), int(self.cnn.embedding_dim))
            if self.cnn.freeze_color:
                module.color.weight.requires_grad_(False)
            return module
        return residual_mlp(int(in_dim), int(in_dim), hidden=256)

    # -- per-image representation ---------------------------------------------------------
    def _image_representation(self, image, sp, module):
        if self.features == "cnn":
            work = working_shape(image.shape[:2], self.cnn.max_side)
            lab_work = cielab(resize(image, work))
            cells = pixel_to_working(image.shape[:2], work)
            pool = pooling_matrix(sp, cells, work[0] * work[1])
            lab_mean = mean_per_segment(cielab(image), sp)
            return ImageCNNRepresentation(module, lab_work, pool, lab_mean)
        return VectorRepresentation(module, self._backbone_descriptors(image, sp))

    # -- predict ----------------------------------------------------------------------------
    def predict(self, image: np.ndarray) -> Segmentation:
        image = check_image(image)
        self._check_params()
        with _torch_threads(self.n_threads):
            if self.scope == "dataset":
                self._check_fitted()
                return self._predict_dataset(image)
            return self._predict_image(image)

    def _predict_image(self, image):
        sp = self._superpixels(image)
        n_sp = int(sp.max()) + 1
        h, w = sp.shape
        if n_sp < 2:
            return Segmentation(np.zeros((h, w), np.int32), np.ones((1, h, w), np.float32),
                                info={"n_superpixels": n_sp},
                                hierarchy=np.zeros((h, w), np.uint16))
        if self.features == "cnn":
            module = self._new_module()
        else:
            module = None
        rep = self._image_representation(image, sp, module)
        if module is None:
            rep.module = self._new_module(rep.inputs.shape[1])
        pairs = superpixel_adjacency(sp)
        result = run_jule(rep, n_clusters=int(self.n_clusters), seed=int(self.seed),
                          connectivity=pairs if self.adjacency else None, complete=True,
                          **self._jule_kwargs())
        labels_sp = result.labels
        emb = result.embeddings
        centroids = _centroids(emb, labels_sp)
        scores_sp, _ = _scores(emb, centroids, labels_sp, float(self.temperature))
        labels = labels_sp[sp].astype(np.int32)
        scores = scores_sp.T[:, sp]
        dendro = result.dendrogram
        ucm = dendrogram_ucm(sp, dendro, levels=self.ucm_levels)
        n_learned = result.history[-1]["merges_to_n_clusters"]
        lv = dendro.levels(self.ucm_levels)
        info = {
            "n_superpixels": n_sp,
            "n_initial_clusters": dendro.n_initial,
            "n_clusters": int(labels_sp.max()) + 1,
            "periods": [e for e in result.history if "period" in e],
            "level_at_n_clusters": float(lv[n_learned - 1]) if n_learned else 0.0,
        }
        return Segmentation(labels, scores=scores, info=info, hierarchy=ucm)

    def _predict_dataset(self, image):
        import torch

        sp = self._superpixels(image)
        module = self._module_for_predict()
        rep = self._image_representation(image, sp, module)
        if self.features == "backbone":
            rep.module = module
        rep.train(False)
        with torch.inference_mode():
            raw = rep.embed(None).double().numpy()
        emb = l2_normalize(raw)
        scores_sp, labels_sp = _scores(emb, self.centroids_, None, float(self.temperature),
                                       scale=float(self.distance_scale_))
        labels = labels_sp[sp].astype(np.int32)
        scores = scores_sp.T[:, sp]
        return Segmentation(labels, scores=scores,
                            info={"n_superpixels": int(sp.max()) + 1})

    def _module_for_predict(self):
        module = getattr(self, "_module", None)
        if module is None:
            module = self._new_module(int(self.input_dim_[0]) if self.features == "backbone"
                                      else None)
            state = getattr(self, "_pending_state", None)
            if state is not None:
                module.load_state_dict(state)
            self._module = module
        module.train(False)
        return module

    # -- fit (dataset scope) ------------------------------------------------------------------
    def fit(self, samples, *, val_samples=None, run=None, progress: bool = False):
        self._check_params()
        if self.scope != "dataset":
            return self
        from tqdm import tqdm

        rng = np.random.default_rng(int(self.seed))
        descs, patches, masks, labs = [], [], [], []
        n_images = 0
        bar = tqdm(samples, desc="jule: sampling superpixels", disable=not progress,
                   unit="img")
        with _torch_threads(self.n_threads):
            for sample in bar:
                if self.max_images is not None and n_images >= int(self.max_images):
                    break
                image = check_image(sample.image)
                sp = self._superpixels(image)
                n_sp = int(sp.max()) + 1
                take = np.sort(rng.choice(n_sp, size=min(n_sp, int(self.samples_per_image)),
                                          replace=False))
                if self.features == "backbone":
                    descs.append(self._backbone_descriptors(image, sp)[take])
                else:
                    p, m = superpixel_patches(image, sp, take, max_side=self.cnn.max_side,
                                              size=int(self.cnn.patch_size))
                    patches.append(p)
                    masks.append(m)
                    labs.append(mean_per_segment(cielab(image), sp)[take])
                n_images += 1
            if n_images == 0:
                raise ValueError("jule fit: no readable image in the samples")
            if self.features == "backbone":
                x = np.concatenate(descs)
                module = self._new_module(x.shape[1])
                rep = VectorRepresentation(module, x)
                self.input_dim_ = np.array([x.shape[1]])
            else:
                module = self._new_module()
                rep = PatchCNNRepresentation(module, np.concatenate(patches),
                                              np.concatenate(masks), np.concatenate(labs))
                self.input_dim_ = np.array([0])
            if rep.n_samples < int(self.n_clusters):
                raise ValueError(f"jule fit: only {rep.n_samples} superpixels sampled, fewer "
                                 f"than n_clusters={self.n_clusters}")
            result = run_jule(rep, n_clusters=int(self.n_clusters), seed=int(self.seed),
                              progress=progress, **self._jule_kwargs())
        emb = result.embeddings
        self.centroids_ = _centroids(emb, result.labels)
        d2 = ((emb - self.centroids_[result.labels]) ** 2).sum(1)
        self.distance_scale_ = np.array(max(float(d2.mean()), 1e-6))
        self.n_fit_samples_ = np.array(rep.n_samples)
        self._module = module
        module.train(False)
        return self

    # -- persistence --------------------------------------------------------------------------
    def _state_arrays(self):
        if not hasattr(self, "centroids_"):
            return {}
        state = {"centroids_": self.centroids_, "distance_scale_": self.distance_scale_,
                 "input_dim_": self.input_dim_, "n_fit_samples_": self.n_fit_samples_}
        return state

    def _state_dict(self):
        module = getattr(self, "_module", None)
        return None if module is None else module.state_dict()

    def _load_state_dict(self, state):
        self._module = None
        self._pending_state = state


# ------------------------------------------------------------------------------------------
# helpers


def _centroids(emb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cluster means of L2-normalised embeddings, re-normalised to unit norm."""
    k = int(labels.max()) + 1
    sums = np.zeros((k, emb.shape[1]))
    np.add.at(sums, labels, emb)
    return l2_normalize(sums)


def _scores(emb, centroids, labels, temperature, *, scale=None):
    """Softmax over negative squared distances to the centroids; also the argmin labels."""
    d2 = ((emb[:, None, :] - centroids[None]) ** 2).sum(-1)
    if scale is None:
        own = d2[np.arange(len(emb)), labels] if labels is not None else d2.min(1)
        scale = max(float(own.mean()), 1e-6)
    logits = -d2 / (temperature * scale)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    return p.astype(np.float32), d2.argmin(1)
