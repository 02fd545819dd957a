"""MoCo v2 (He et al. 2020, Chen et al. 2020; facebookresearch/moco): ``method`` (the trainable
unit), ``keys`` (momentum key encoder, key queue, shuffle BN, the loss over the queue)."""
from .method import MoCo, MoCoConfig  # noqa: F401
