"""D-Cube (Jang et al.): hyper-features of a frozen class-conditional diffusion model, selected by a
Kolmogorov-Smirnov Gaussianity test, classified by the D-Cube head. Importing registers ``dcube``."""
from diffmed.methods.dcube.features import FrozenDiffusion, feature_shapes, seeded_noise
from diffmed.methods.dcube.gaussianity import (GaussianityAnalysis, Selection, analyze_gaussianity, ks_normal,
                                               layer_gaussianity, read_selection, select_layers, write_analysis)
from diffmed.methods.dcube.head import DCubeHead, SubFeatures
from diffmed.methods.dcube.method import TABLE_IV, TABLE_VI, TABLE_VII, DCube, DCubeParams

__all__ = [
    "DCube", "DCubeHead", "DCubeParams", "FrozenDiffusion", "GaussianityAnalysis", "Selection", "SubFeatures",
    "TABLE_IV", "TABLE_VI", "TABLE_VII", "analyze_gaussianity", "feature_shapes", "ks_normal", "layer_gaussianity",
    "read_selection", "seeded_noise", "select_layers", "write_analysis",
]
