"""`jule`: JULE-style recurrent agglomerative clustering with joint representation learning.

- :mod:`methods.jule.core`: the generic core (any samples + a torch representation module):
  graph degree linkage affinity, the paper's merge criterion and schedule, the weighted
  triplet loss, the dendrogram.
- :mod:`methods.jule.learning`: the backward pass (representations, the weighted triplet
  loss and its updates).
- :mod:`methods.jule.segmentation`: the registered segmentation method ``jule`` (superpixels
  as samples, per image or over a dataset), with :mod:`methods.jule.regions` (superpixel
  geometry, the contour map) and :mod:`methods.jule.representations`.
"""

from methods.jule.core import Dendrogram, JuleResult, run_jule  # noqa: F401
from methods.jule.segmentation import CnnOptions, Jule, Learning, dendrogram_ucm  # noqa: F401
