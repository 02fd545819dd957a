"""SimCLR (Chen et al. 2020): ``method`` (the trainable unit), ``ntxent`` (NT-Xent over every
rank's samples). Its LARS optimiser is fastinst.train.optim's."""
from .method import SimCLR, SimCLRConfig  # noqa: F401
