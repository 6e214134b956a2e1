"""Class-conditional sampling: a short, explicit denoising loop over a respaced diffusers scheduler.

Guidance convention (Ho & Salimans): ``pred = uncond + w * (cond - uncond)``; w = 1 is the plain
conditional model (one forward per step), w > 1 strengthens the class, w = 0 is unconditional. For
w != 1 the conditional and null-class inputs run as one batched forward.

Randomness: the initial noise and the stochastic steps (DDPM, DDIM with eta > 0) come from the given
CPU ``torch.Generator`` -- or one generator per image, in which case an image depends only on its own
generator and label, not on which other images share its batch (resumable generation relies on this).
"""
from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from diffmed.diffusion.backbones import DenoisingBackbone
from diffmed.diffusion.schedule import SAMPLERS, Sampler, sampling_scheduler
from diffmed.errors import ConfigError

Generators = torch.Generator | list[torch.Generator]


def guided_prediction(net: DenoisingBackbone, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                      guidance_scale: float) -> torch.Tensor:
    """The network output with classifier-free guidance (cond and null-cond in one forward)."""
    if guidance_scale == 1.0:
        return net(x, t, labels)
    null = torch.full_like(labels, net.null_class)
    cond, uncond = net(torch.cat([x, x]), t, torch.cat([labels, null])).chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def _check(model, labels: torch.Tensor, steps: int, sampler: str, eta: float, generator: Generators,
           batch_size: int) -> None:
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler '{sampler}' is not one of {list(SAMPLERS)}")
    if eta != 0.0 and sampler != "ddim":
        raise ConfigError(f"eta={eta} applies to the ddim sampler only (ddpm is always stochastic)")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    if labels.ndim != 1 or (len(labels) and (labels.min() < 0 or labels.max() > model.null_class)):
        raise ConfigError(f"labels must be a 1-D tensor of class indices 0..{model.null_class} "
                          f"({model.null_class} = unconditional)")
    if isinstance(generator, list) and len(generator) != len(labels):
        raise ValueError(f"got {len(generator)} generators for {len(labels)} labels; give one per image")


@torch.inference_mode()
def sample(model, labels: torch.Tensor, *, generator: Generators, steps: int = 50, sampler: Sampler = "ddim",
           guidance_scale: float = 1.0, eta: float = 0.0, batch_size: int = 64) -> torch.Tensor:
    """Images of the given classes, (N, C, H, W) in [0, 1] on the CPU, in ``batch_size`` chunks.

    ``model`` is a ClassConditionalDiffusion (its sampling, i.e. EMA, weights are used). The same
    generator seed gives the same images.
    """
    _check(model, labels, steps, sampler, eta, generator, batch_size)
    net = model.sampling_network
    was_training = net.training
    net.eval()
    out = []
    try:
        for lo in range(0, len(labels), batch_size):
            gen = generator[lo: lo + batch_size] if isinstance(generator, list) else generator
            out.append(_sample_batch(model, net, labels[lo: lo + batch_size], gen, steps, sampler,
                                     guidance_scale, eta))
    finally:
        net.train(was_training)
    shape = (0, model.spec.channels, model.spec.image_size, model.spec.image_size)
    return torch.cat(out) if out else torch.empty(shape)


def _sample_batch(model, net: DenoisingBackbone, labels: torch.Tensor, generator: Generators, steps: int,
                  sampler: str, guidance_scale: float, eta: float) -> torch.Tensor:
    p, spec = model.params, model.spec
    device = next(net.parameters()).device
    labels = labels.to(device=device, dtype=torch.long)
    sched = sampling_scheduler(sampler, steps, p.beta_schedule, p.prediction_type, p.num_train_timesteps)
    shape = (len(labels), spec.channels, spec.image_size, spec.image_size)
    x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * sched.init_noise_sigma
    extra = {"eta": eta} if sampler == "ddim" else {}
    for t in sched.timesteps:
        pred = guided_prediction(net, sched.scale_model_input(x, t), t.to(device), labels, guidance_scale)
        x = sched.step(pred.float(), t, x, generator=generator, **extra).prev_sample
    return to_unit_range(x, spec.mean, spec.std).cpu()


def to_unit_range(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Undo the data normalisation (``(x - mean) / std``) and clip to [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)
