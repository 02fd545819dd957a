"""fastinst: instance-discrimination pretraining built around the input pipeline.

Packages by role, imports running one way (a package imports only those listed before it):

    core     runtime, collectives, the sharded-rows block, model, device-side guard, kNN
    config   the typed config tree, YAML and overrides
    methods  one folder per method: its adapter to the engine beside its maths; the registry
    train    builders, trainer state and step, the loop, schedules, optimisers, checkpoints
    eval     frozen trunks, linear probe, SVMs, export

The data path is the sibling package ``loaders`` (it imports core and config only).
tests/test_layout.py checks these rules from the imports.
"""
