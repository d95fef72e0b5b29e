"""The Hydra config tree. Its `generation` group has one option, `nemo`: NeMo's generation defaults, taken from
the schema (conf/schema.py Generation) so that they are written in one place."""
from hydra.core.config_store import ConfigStore

from fleetgen.conf.schema import Generation

ConfigStore.instance().store(group="generation", name="nemo", node=Generation().model_dump())
