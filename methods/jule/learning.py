"""The backward pass of JULE: the learnable representation and its updates.

Yang, Parikh & Batra, CVPR 2016: between two periods of agglomeration
(:func:`methods.jule.core.run_jule`) the representation is trained with the weighted triplet
loss on triplets from the period's merges (anchor in the merged cluster ``C_i``, positive in its partner ``N_1``,
negatives in ``N_2 .. N_Kc``). Also the representations the lab uses: samples given as one
tensor (:class:`TensorRepresentation`), a small CNN for tiny images and a residual MLP that
starts as a rotation of its input.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Representation", "TensorRepresentation", "weighted_triplet_loss", "small_convnet",
           "residual_mlp"]


class Representation:
    """What :func:`methods.jule.core.run_jule` needs from a learnable representation.

    Subclasses hold a torch module and implement :meth:`embed`; :meth:`parameters` defaults to
    the module's parameters.

    Attributes
    ----------
    n_samples : int
    module : torch.nn.Module
    """

    n_samples: int
    module = None

    def embed(self, indices=None):
        """Embeddings of the samples ``indices`` (a LongTensor; None = all), shape (k, d),
        differentiable with respect to :meth:`parameters` when grad is enabled."""
        raise NotImplementedError

    def parameters(self):
        return list(self.module.parameters())

    def train(self, mode: bool = True):
        if self.module is not None:
            self.module.train(mode)


def weighted_triplet_loss(anchor, positive, negatives, *, gamma: float = 2.0,
                          margin: float = 0.2, weight: float = 0.25):
    """JULE's weighted triplet loss on L2-normalised embeddings.

    Parameters
    ----------
    anchor, positive : Tensor, shape (b, d)
    negatives : Tensor, shape (b, k, d)
    gamma : float
        Weight of the positive (same-cluster) term.
    margin : float
    weight : float
        ``lambda / (K_c - 1)``.

    Returns
    -------
    Tensor
        ``weight * sum_k max(0, margin + gamma d(a, p) - d(a, n_k))``, averaged over anchors.
    """
    import torch

    d_pos = ((anchor - positive) ** 2).sum(-1)
    d_neg = ((anchor[:, None, :] - negatives) ** 2).sum(-1)
    hinge = torch.relu(margin + gamma * d_pos[:, None] - d_neg)
    return weight * hinge.sum(1).mean()


class _Optimizer:
    """Plain SGD-with-momentum / Adam steps (the torch.optim update rules, L2 weight decay).

    Written here because constructing any ``torch.optim`` optimiser imports ``torch._dynamo``,
    which takes 5-12 s on this 2-core machine: more than a whole per-image JULE run.
    """

    def __init__(self, params, *, kind: str, lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        import torch

        self.params = [p for p in params if p.requires_grad]
        self.kind, self.lr, self.momentum = kind, float(lr), float(momentum)
        self.weight_decay, self.betas, self.eps = float(weight_decay), betas, float(eps)
        self.state = [[torch.zeros_like(p), torch.zeros_like(p)] for p in self.params]
        self.t = 0

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None

    def step(self):
        import torch

        self.t += 1
        b1, b2 = self.betas
        with torch.no_grad():
            for p, (m, v) in zip(self.params, self.state, strict=True):
                if p.grad is None:
                    continue
                g = p.grad
                if self.weight_decay:
                    g = g.add(p, alpha=self.weight_decay)
                if self.kind == "sgd":
                    if self.t > 1:
                        m.mul_(self.momentum).add_(g)
                    else:
                        m.copy_(g)
                    p.add_(m, alpha=-self.lr)
                else:
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    step = self.lr / (1 - b1 ** self.t)
                    denom = (v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
                    p.addcdiv_(m, denom, value=-step)


class _MemberIndex:
    """Sample indices of the clusters that exist during one period (created lazily)."""

    def __init__(self, labels: np.ndarray):
        ids, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(ids)))])
        self._members = {int(c): order[bounds[r]:bounds[r + 1]] for r, c in enumerate(ids)}

    def merged(self, a: int, b: int, c: int) -> None:
        self._members[c] = np.concatenate([self._members[a], self._members[b]])

    def __getitem__(self, cid: int) -> np.ndarray:
        return self._members[cid]


class _MergeTripletSampler:
    """The paper's triplets: for a merge ``t`` of the period (``C_i`` into its nearest cluster
    ``N_1``): anchor from ``C_i``, positive from ``N_1``, negatives from ``N_2 .. N_Kc``
    (as they were at time ``t``). Missing negatives (fewer neighbours) are drawn from the
    samples of other clusters at the end of the period."""

    def __init__(self, records, members, labels, n_negatives):
        self.records = records
        self.members = members
        self.labels = labels
        self.n_negatives = n_negatives

    def __call__(self, n_anchors: int, rng: np.random.Generator):
        n = len(self.labels)
        pick = rng.integers(0, len(self.records), size=n_anchors)
        anchors = np.empty(n_anchors, np.int64)
        positives = np.empty(n_anchors, np.int64)
        negatives = np.empty((n_anchors, self.n_negatives), np.int64)
        for t, r in enumerate(pick):
            i, j, nbrs = self.records[r]
            mi, mj = self.members[i], self.members[j]
            anchors[t] = mi[rng.integers(len(mi))]
            positives[t] = mj[rng.integers(len(mj))]
            for k in range(self.n_negatives):
                if k < len(nbrs):
                    mk = self.members[nbrs[k]]
                    negatives[t, k] = mk[rng.integers(len(mk))]
                else:
                    cand = int(rng.integers(n))
                    for _ in range(8):  # a sample of another (end-of-period) cluster
                        if self.labels[cand] != self.labels[anchors[t]]:
                            break
                        cand = int(rng.integers(n))
                    negatives[t, k] = cand
        return anchors, positives, negatives


def _update_representation(representation, optimizer, sampler, *, rng, n_iter, batch_size,
                           gamma, margin, weight) -> float:
    """``n_iter`` steps of the weighted triplet loss on the sampler's triplets; the mean loss."""
    import torch
    import torch.nn.functional as F

    representation.train(True)
    losses = []
    for _ in range(int(n_iter)):
        a, p, ng = sampler(batch_size, rng)
        n_negatives = ng.shape[1]
        idx = np.concatenate([a, p, ng.ravel()])
        uniq, inv = np.unique(idx, return_inverse=True)
        emb = F.normalize(representation.embed(torch.from_numpy(uniq)), dim=1)
        e = emb[torch.from_numpy(inv)]
        b = len(a)
        loss = weighted_triplet_loss(e[:b], e[b:2 * b], e[2 * b:].reshape(b, n_negatives, -1),
                                     gamma=gamma, margin=margin, weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    representation.train(False)
    return float(np.mean(losses)) if losses else 0.0


class TensorRepresentation(Representation):
    """Samples given as one tensor (images or vectors), embedded by ``module`` batch by batch.

    Parameters
    ----------
    inputs : Tensor, shape (n, ...)
    module : torch.nn.Module
        Maps a batch of inputs to (b, d) embeddings.
    """

    def __init__(self, inputs, module):
        self.inputs = inputs
        self.module = module
        self.n_samples = int(inputs.shape[0])

    def embed(self, indices=None):
        x = self.inputs if indices is None else self.inputs[indices]
        return self.module(x)


def small_convnet(in_channels: int, out_dim: int = 160, *, width: int = 32,
                  input_size: int = 8):
    """A small CNN for tiny images (e.g. 8x8 digits): two conv-ReLU blocks, a 2x2 max-pool,
    a conv block and a linear layer to ``out_dim`` (JULE's MNIST/USPS nets end with a
    160-d embedding that is L2-normalised before the affinity)."""
    import torch.nn as nn

    side = input_size // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(2 * width * side * side, out_dim),
    )


def residual_mlp(in_dim: int, out_dim: int | None = None, *, hidden: int = 256):
    """An embedding that starts as a distance-preserving map of its input and learns from there.

    ``f(x) = Q x + V relu(U x)`` with ``Q`` (out x in) orthonormal-initialised (so the initial
    embedding keeps the input's geometry: JULE's affinity on the raw vectors) and ``V``
    zero-initialised; both ``Q`` and the residual branch are learned.
    """
    import torch
    import torch.nn as nn

    out_dim = int(out_dim or in_dim)

    class _ResidualMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(in_dim, out_dim, bias=False)
            nn.init.orthogonal_(self.linear.weight)
            self.hidden = nn.Linear(in_dim, hidden)
            self.out = nn.Linear(hidden, out_dim)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

        def forward(self, x):
            x = x.flatten(1)
            return self.linear(x) + self.out(torch.relu(self.hidden(x)))

    return _ResidualMLP()
