"""Evaluation protocols of a trained checkpoint, on top of everything else.

- ``frozen``: the frozen pretrained trunk(s) and their pooled / per-stage features;
- ``linear``: the linear probe (one head, or one per ResNet stage);
- ``svm``: the VOC07-style SVMs and the low-shot SVMs;
- ``export``: a checkpoint's trunks read safely and written for torchvision, detectron2, mmdet
  and timm.

Imports: any layer below (fastinst.core, config, methods, train) and the loaders.
"""
from .. import methods  # noqa: F401  (registers the methods' config sections)
