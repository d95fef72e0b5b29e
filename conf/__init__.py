"""The Hydra config tree. Every key's default is written once, in the schema (conf/schema.py): config.yaml's
defaults list takes them from the `schema` node stored here, and the `generation` group's one option, `nemo`,
is NeMo's generation defaults (Generation). Group options (cluster/, container/) and recipes override them."""
from hydra.core.config_store import ConfigStore
from pydantic import BaseModel

from fleetgen.conf.schema import Generation, LaunchConfig

GROUPS = ("cluster", "container", "generation")  # their options are files (or `nemo` below), chosen by name


def schema_defaults(model: type[BaseModel] = LaunchConfig) -> dict:
    """Every key's default as the schema gives it; "???" (Hydra's missing value) where it gives none."""
    node = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            node[name] = schema_defaults(field.annotation)
        elif field.is_required():
            node[name] = "???"
        else:
            node[name] = field.get_default(call_default_factory=True)
    return node


ConfigStore.instance().store(name="schema", node={k: v for k, v in schema_defaults().items() if k not in GROUPS})
ConfigStore.instance().store(group="generation", name="nemo", node=Generation().model_dump())
