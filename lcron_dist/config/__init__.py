"""Job configuration: dataclass sections, TOML files, command-line overrides."""

from lcron_dist.config.job_config import JobConfig
from lcron_dist.config.loader import load_config, to_dict

__all__ = ["JobConfig", "load_config", "to_dict"]
