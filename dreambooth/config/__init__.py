"""The run's configuration: the schema (schema.py), config files in and out (parse.py), and the plan a run resolves
to on this machine (plan.py, with machine.py and the memory profiles in profiles.py)."""

from dreambooth.config.machine import Machine
from dreambooth.config.parse import config_to_dict, flatten_config, save_config
from dreambooth.config.plan import RunPlan, resolve
from dreambooth.config.schema import Config, config_from_dict, load_config, schema_rows

__all__ = ["Config", "Machine", "RunPlan", "config_from_dict", "config_to_dict", "flatten_config", "load_config",
           "resolve", "save_config", "schema_rows"]
