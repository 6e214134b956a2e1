"""Class-conditional image diffusion: schedules (diffusers), UNet / U-ViT backbones, the generative model
(DDPM + classifier-free guidance + D-Cube's contrastive L_Gen), samplers and class-targeted generation.

The trained generator is also a frozen feature extractor: ``load_generator(run)`` then
``capture_block_outputs(model.backbone, x_t, t, labels)`` gives every block's feature map. Generation: ``diffmed.diffusion.generate.generate`` (not re-exported
here, so that the name ``diffmed.diffusion.generate`` stays the module).
"""
from diffmed.diffusion.backbones import (DenoisingBackbone, UNetBackbone, UViT, build_backbone,
                                         capture_block_outputs, capturing, middle_features, pool_features)
from diffmed.diffusion.generate import GenerationResult, request_counts
from diffmed.diffusion.generative import (ClassConditionalDiffusion, GenerativeParams, contrastive_loss,
                                          fit_generator, load_generator, parse_params, train_generator)
from diffmed.diffusion.sampling import guided_prediction, sample
from diffmed.diffusion.schedule import sampling_scheduler, training_scheduler

__all__ = [
    "ClassConditionalDiffusion", "DenoisingBackbone", "GenerationResult", "GenerativeParams", "UNetBackbone", "UViT",
    "build_backbone", "capture_block_outputs", "capturing", "contrastive_loss", "fit_generator",
    "guided_prediction", "load_generator", "middle_features", "parse_params", "pool_features", "request_counts",
    "sample", "sampling_scheduler", "train_generator", "training_scheduler",
]
