"""Registered classifier methods; importing this package registers every built-in method."""
from diffmed.methods.base import BaseParams, ClassifierMethod, StageContext
from diffmed.methods.registry import METHODS, create_method, method_params, saved_method_params
from diffmed.methods import baseline  # noqa: F401  (registers "baseline")
from diffmed.methods import dcube, diffmic, diffusion_classifier, simclr  # noqa: F401  (dcube, diffmic_v2, diffusion_classifier, dit_probe, simclr)

__all__ = ["METHODS", "create_method", "method_params", "saved_method_params", "ClassifierMethod", "BaseParams",
           "StageContext"]
