"""Training: what turns a config and a method into a run.

- ``build``: the builders (amp mode, encoders, loaders, the method, its plan: optimisers,
  schedules, stages, the clock);
- ``trainer``: the run's state (`Trainer`, what a checkpoint holds) and the step;
- ``engine``: the loop (one screen), ``train`` and ``evaluate_checkpoint``;
- ``schedule``: lr schedules, the clock of stages / evaluations / saves, preemption;
- ``optim``: SGD, LARS, Adam, the lr scaling rule and the factory methods build optimisers with;
- ``checkpoint``: atomic per-rank checkpoints with a COMPLETE marker; ``reshard``: their row
  manifest, loaded at any world size;
- ``metrics``: throughput, metrics.jsonl / TensorBoard, progress and ETA lines;
- ``evaluation``: the weighted kNN evaluation during training.

Imports: fastinst.core, fastinst.config, fastinst.methods (the registry, the protocol) and the
loaders; never fastinst.eval. Importing it registers the methods.
"""
from .. import methods  # noqa: F401  (registers the methods' config sections)
