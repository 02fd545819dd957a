"""NPID / InstDisc (Wu et al. 2018; lemniscate.pytorch): ``method`` (the trainable unit),
``bank`` (the sharded memory bank), ``nce`` (NCE, sampled and full softmax over the bank)."""
from .method import NPID, NPIDConfig  # noqa: F401
