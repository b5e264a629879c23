"""Which environment families the service can build, by name, imported on first use."""

from __future__ import annotations

import importlib
from functools import cache

from services.env.base import EnvironmentFamily

# name -> "module:attribute" of an EnvironmentFamily class; third-party engines are
# imported only when a service is told to serve them.
FAMILIES: dict[str, str] = {
    "household": "services.env.household:HouseholdEnvironment",
    "alfworld": "services.env.alfworld:AlfworldEnvironment",
    "alfworld-generated": "services.env.alfworld:AlfworldGeneratedEnvironment",
    "scienceworld": "services.env.scienceworld:ScienceWorldEnvironment",
    "scienceworld-easy": "services.env.scienceworld:ScienceWorldEasyEnvironment",
    "textworld-cooking": "services.env.textworld_games:TextWorldCookingEnvironment",
    "twx-cookingworld": "services.env.textworld_games:TextWorldExpressEnvironment",
    "twx-twc": "services.env.textworld_games:TwxTwcEnvironment",
}


class UnknownEnvironment(KeyError):
    pass


@cache
def get_family(name: str) -> EnvironmentFamily:
    """The (process-wide) family for ``name``; raises UnknownEnvironment."""
    if name not in FAMILIES:
        raise UnknownEnvironment(name)
    module_name, attribute = FAMILIES[name].split(":")
    family_class = getattr(importlib.import_module(module_name), attribute)
    return family_class()
