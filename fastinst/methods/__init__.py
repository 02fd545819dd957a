"""The methods: each self-supervised method is one folder here, its adapter to the engine
(``method.py``, a `fastinst.methods.base.Method` registered by name, with its config section)
beside its maths (banks, losses, classifiers, queues), each piece testable alone:

- ``npid/``: NPID / InstDisc: the sharded memory bank (``bank``), NCE and softmax losses (``nce``);
- ``pic/``: PIC: the sharded classifier rows (``classifier``) and their exact lazy SGD (``lazysgd``);
- ``moco/``: MoCo v2: key encoder, key queue, shuffle BN and the queue loss (``keys``);
- ``simclr/``: SimCLR: NT-Xent over all ranks (``ntxent``);
- ``cmc/``: CMC: two trunks and two NPID banks (NPID's pieces);
- ``isl/``: ISL: the neighbour loss (``loss``), the feature-space GAN (``gan``), the neighbour
  table (``table``).

Adding a method is a new folder plus one line below. Importing this package registers the
shipped methods (`registry`) and hands their config sections to fastinst.config.

Imports: fastinst.core and fastinst.config; a method may use another method's pieces (CMC and
ISL use NPID's bank). Never fastinst.train or fastinst.eval, nor the loaders.
"""
from ..config import use_method_registry
from .registry import (_REGISTRY, available, check_config, method_class, method_config_type, register,  # noqa: F401
                       registered)

# The shipped methods, one line each (each registers itself; this order is `available()`'s).
from .npid import NPID  # noqa: F401
from .pic import PIC  # noqa: F401
from .moco import MoCo  # noqa: F401
from .simclr import SimCLR  # noqa: F401
from .cmc import CMC  # noqa: F401
from .isl import ISL  # noqa: F401

use_method_registry(method_config_type, check_config)
