"""diffmed: diffusion models for medical image classification with scarce, imbalanced data."""
__version__ = "0.1.0"
