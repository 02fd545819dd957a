"""The bottom layer: what every other layer builds on, and nothing above it.

- ``runtime``: `DistEnv` (ranks and device, the loaders' too), distributed init, derived seeds,
  RNG state;
- ``dist``: the differentiable collectives and their gradient convention;
- ``rows``: the sharded-rows block (global row ranges, owner / local index, init, reads,
  gathers, checked layout, the fused momentum update, the sharded log-sum-exp and Partial-FC
  cross-entropy): NPID's bank, CMC's banks, PIC's classifier and ISL's table are built on it;
- ``model``: torchvision ResNet trunks + heads, channels-last, AMP;
- ``guard``: the non-finite guard decided on the device (gated optimiser steps, `where_`, the
  counts) and the optimisers' ``step(closure)`` convention;
- ``knn``: the weighted kNN classifier over sharded train features (training-time evaluation,
  the SVM protocol's neighbours, the GPU suite).

Imports: torch, torchvision and the standard library; nothing else of fastinst.
"""
