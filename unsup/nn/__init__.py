"""The training package: everything the network-based methods share.

- :mod:`unsup.nn.networks`: the segmentation networks (pretrained encoder + FCN / U-Net /
  DeepLab decoder, one factory) and their inference;
- :mod:`unsup.nn.loop`: the one training loop (checkpoints, resume, time budget, early
  stopping, history, curves);
- :mod:`unsup.nn.losses`, :mod:`unsup.nn.task`: the segmentation loss and the training step;
- :mod:`unsup.nn.data`: the on-disk sample cache and the training batches;
- :mod:`unsup.nn.validation`: validation scores, counted by the harness's confusion code;
- :mod:`unsup.nn.method`: :class:`~unsup.nn.method.NetworkMethod`, the base class of
  ``supervised`` and ``boxsup``, with its ``network`` and ``augment`` option groups;
- :mod:`unsup.nn.runtime`: the device, seeding and torch-threads helpers used everywhere.

Importing the package does not import torch; its modules do when they need it.
"""
