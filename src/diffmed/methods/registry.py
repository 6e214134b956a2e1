"""The method registry; ``create_method`` builds a registered classifier from its name and options."""
from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import ValidationError

from diffmed.config import OptimConfig
from diffmed.data.types import TaskSpec
from diffmed.errors import ConfigError
from diffmed.registry import Registry

METHODS: Registry = Registry("method")


def method_params(name: str, params: dict[str, Any]):
    """The method's validated options; fails before any data is loaded on a bad name or option."""
    cls = METHODS.get(name)
    try:
        return cls.Params.model_validate(params)
    except ValidationError as err:
        lines = [f"  method.params.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        known = ", ".join(cls.Params.model_fields)
        raise ConfigError(f"invalid options for method '{name}':\n" + "\n".join(lines) + f"\n  known options: {known}") from None


def create_method(name: str, spec: TaskSpec, params: dict[str, Any], optim: OptimConfig, max_epochs: int,
                  class_counts: np.ndarray | None = None):
    return METHODS.get(name)(spec, method_params(name, params), optim, max_epochs, class_counts)


def saved_method_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """A saved model's options to rebuild it for its saved weights: ``params`` over the former defaults of the
    options it predates, and no pretrained start (``pretrained``, ``*_pretrained``): the saved weights replace it,
    and the hub or the file it came from may be out of reach where the model is used."""
    params = {k: False if k == "pretrained" or k.endswith("_pretrained") else v for k, v in params.items()}
    return {**METHODS.get(name).Params.saved_defaults, **params}
