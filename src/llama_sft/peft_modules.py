"""How PEFT wraps a model's modules, for the training run and the speed-ups alike.

Contract: ``serving_module(module)`` is the module that runs in ``module``'s place (a
``modules_to_save`` wrapper's trained copy, or the module itself); ``replaced_base_modules(model)``
lists the frozen base modules whose trained copy serves every active adapter, so training can free
them.
"""

from __future__ import annotations

import torch
from peft.utils import ModulesToSaveWrapper


def serving_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module that runs in ``module``'s place: for PEFT's ``modules_to_save`` wrapper, the
    trained copy of its active adapter, or the base module when adapters are off or the active one
    has no copy; any other module is itself."""
    if not isinstance(module, ModulesToSaveWrapper):
        return module
    if module.disable_adapters or module.active_adapter not in module.modules_to_save:
        return module.original_module
    return module.modules_to_save[module.active_adapter]


def replaced_base_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The base modules whose ``modules_to_save`` copy serves every active adapter of ``model``."""
    return [
        module.original_module
        for module in model.modules()
        if isinstance(module, ModulesToSaveWrapper)
        and not module.disable_adapters
        and all(name in module.modules_to_save for name in module.active_adapters)
    ]
