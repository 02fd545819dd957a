"""ISL (Wang et al. 2021; ZiweiWangTHU/ISL): ``method`` (rounds of stages), ``loss`` (the
neighbour loss over the sharded bank), ``gan`` (the feature-space GAN, its losses, the mining
radius and the stopping rule), ``table`` (the sharded symmetric neighbour table)."""
from .method import ISL, ISLConfig  # noqa: F401
