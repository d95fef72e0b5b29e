"""Compose a recipe's Hydra config and check it before anything is submitted."""
from __future__ import annotations

import re
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import ValidationError

import fleetgen.conf
import fleetgen.recipes
from fleetgen.conf import schema_defaults
from fleetgen.conf.schema import LaunchConfig
from fleetgen.launcher.errors import LaunchError

CONF_DIR = Path(fleetgen.conf.__path__[0])
RECIPES_DIR = Path(fleetgen.recipes.__path__[0])
DATA_DIR = RECIPES_DIR / "data"

# Recipes name shipped files as ${fleetgen_data:tiny-gpt2}: they resolve wherever the package is installed.
if not OmegaConf.has_resolver("fleetgen_data"):
    OmegaConf.register_new_resolver("fleetgen_data", lambda rel: str(DATA_DIR / rel))


def recipes() -> dict[str, str]:
    """Every recipe's name and one-line description."""
    found = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        found[path.stem] = (yaml.safe_load(path.read_text()) or {}).get("description", "")
    return found


def compose_recipe(recipe: str, overrides: list[str]) -> DictConfig:
    known = recipes()
    if recipe not in known:
        raise LaunchError(f"unknown recipe {recipe!r}. Known recipes: {', '.join(known)} "
                          "(`launch --list` describes them).")
    hydra_overrides = [f"hydra.searchpath=[file://{RECIPES_DIR.parent}]", f"+{RECIPES_DIR.name}={recipe}",
                       f"recipe={recipe}", *overrides]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=hydra_overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise LaunchError(_explain_override_error(str(e), overrides)) from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise LaunchError(f"config of recipe {recipe!r} does not resolve: {e}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise LaunchError(f"recipe {recipe!r} leaves {', '.join(missing)} unset; "
                          f"give {missing[0]}=VALUE on the command line.")
    return cfg


def _explain_override_error(message: str, overrides: list[str]) -> str:
    unknown = re.search(r"Could not override '([^']+)'", message) or re.search(r"Key '([^']+)' is not in struct",
                                                                              message)
    if unknown:
        key = unknown.group(1)
        parent = key.rpartition(".")[0]
        valid = _keys_under(parent)
        where = f"under '{parent}'" if parent else "at the top level"
        return (f"unknown override key '{key}'. Valid keys {where}: {', '.join(valid)}. "
                "Keys are listed by `launch RECIPE --dry-run`.")
    first_line = message.strip().splitlines()[0] if message.strip() else message
    return f"invalid override ({' '.join(overrides)}): {first_line}"


def _keys_under(dotted: str) -> list[str]:
    node = OmegaConf.create({k: v for k, v in schema_defaults().items() if k not in ("cluster", "container")})
    for group in ("cluster", "container"):  # groups' keys, as composed by default
        node[group] = OmegaConf.merge(*(OmegaConf.load(p) for p in sorted((CONF_DIR / group).glob("*.yaml"))))
    node = OmegaConf.select(node, dotted) if dotted else node
    return sorted(k for k in node.keys() if k != "defaults") if isinstance(node, DictConfig) else []


def parse_config(data: dict) -> LaunchConfig:
    """The composed config, typed; every bad value is named in one LaunchError."""
    try:
        return LaunchConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg'].removeprefix('Value error, ')}"
                             + (f" (got {err['input']!r})" if not isinstance(err.get("input"), dict) else "")
                             for err in e.errors())
        raise LaunchError(f"invalid config: {problems}") from None
