"""PIC (Cao et al. 2020; bl0/PIC): ``method`` (the trainable unit), ``classifier`` (the sharded
cosine classifier rows), ``lazysgd`` (exact SGD on row-sparse updates: the weight-update
correction)."""
from .method import PIC, PICConfig  # noqa: F401
