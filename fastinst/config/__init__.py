"""The config package: YAML files and ``key.sub=value`` overrides -> a tree of typed, frozen
dataclasses (`Config`), and back.

- ``errors``: `ConfigError` and `check`, what every section and every layer raises with;
- ``files``: the YAML / overrides layer, generic over the root dataclass;
- ``sections``, ``aug_sections``, ``eval_sections``: the sections of the data path, the views,
  the model, the training run, the evaluation protocols and the process group;
- ``tree``: `Config`, `load_config`, `for_world`; the ``method`` section comes from the method
  registry, which hands it over on import (`use_method_registry`).

Imports: the standard library and PyYAML only; nothing else of fastinst (the methods, the
builders and the evaluation protocols all import this package, never the reverse).
"""
from .errors import ConfigError, check  # noqa: F401
from .eval_sections import DistConfig, EvalConfig, LinearConfig, SVMConfig  # noqa: F401
from .files import apply_overrides, load_yaml, parse_override, save_config, to_dict  # noqa: F401
from .aug_sections import AugConfig, CropConfig, MixConfig, RandAugmentConfig  # noqa: F401
from .sections import DataConfig, LoaderConfig, ModelConfig, ProfileConfig, SamplerConfig, TrainConfig  # noqa: F401
from .tree import Config, config_from_dict, for_world, load_config, use_method_registry  # noqa: F401
