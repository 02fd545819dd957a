"""CMC (Tian et al. 2019; HobbitLong/CMC): ``method``, two trunks (L | ab or Y | CbCr) scored
against each other's NPID memory bank (fastinst.methods.npid's bank and loss)."""
from .method import CMC, CMCConfig  # noqa: F401
