"""DiffMIC-v2 (method ``diffmic_v2``): dual-granularity guided, heterologous label-space diffusion.

dcg.py (priors and ROI crops), denoiser.py (the label-map UNet), method.py (stages, training, sampling).
"""
from diffmed.methods.diffmic.method import VARIANTS, DiffMICParams, DiffMICv2

__all__ = ["DiffMICv2", "DiffMICParams", "VARIANTS"]
