"""`jule`: JULE-style recurrent agglomerative clustering with joint representation learning.

- :mod:`methods.jule.core`: the generic core (any samples + a torch representation module):
  graph degree linkage affinity, the paper's merge criterion and schedule, the weighted
  triplet loss, the dendrogram.
- :mod:`methods.jule.segmentation`: the registered segmentation method ``jule`` (superpixels
  as samples, per image or over a dataset).
"""

from methods.jule.core import Dendrogram, JuleResult, run_jule  # noqa: F401
from methods.jule.segmentation import Jule, dendrogram_ucm  # noqa: F401
