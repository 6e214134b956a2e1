"""Network builders shared by methods (timm backbones with a small-image option)."""
from diffmed.models.backbones import create_backbone, is_vit, load_weights_file

__all__ = ["create_backbone", "is_vit", "load_weights_file"]
