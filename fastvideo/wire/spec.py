"""``ModelSpec``: the architecture facts both sides need before (or without) any weights.

A family's registration reads it from a checkpoint's config files; the driver validates
requests against it and the pipelines size their tensors with it. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

# What a model does with an input image: nothing, optionally (TI2V), or it needs one.
IMAGE_INPUTS = ("none", "optional", "required")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts of one checkpoint.

    Args:
        family: the registered family name (e.g. ``"wan"``).
        pipeline_class_name: model_index.json's ``_class_name``.
        num_heads: attention heads of the DiT (bounds the Ulysses degree).
        in_channels: latent channels the DiT reads per frame.
        patch_size: (pt, ph, pw) DiT patch in latent frames/pixels.
        vae_scale_spatial / vae_scale_temporal: the VAE's compression.
        max_positions: rotary table size per axis (tokens).
        hidden_size / num_layers: DiT width and depth (for the work estimate).
        image_input: ``"none"``, ``"optional"`` or ``"required"``.
        latent_channels: channels of the VAE latent (the noise drawn per frame).
        num_train_timesteps: the sampler's training steps (bounds inference steps).
        guidance: ``"cfg"`` (``guidance_scale`` is classifier-free guidance) or
            ``"embedded"`` (it is a DiT input; CFG comes from ``true_cfg_scale``).
        max_sequence_length: most text tokens a request may ask for.
        experts: DiTs that share the denoising loop (Wan2.2 A14B: 2, switched by timestep).
    """

    family: str
    pipeline_class_name: str
    num_heads: int
    in_channels: int
    patch_size: tuple[int, int, int]
    vae_scale_spatial: int
    vae_scale_temporal: int
    max_positions: int
    hidden_size: int = 0
    num_layers: int = 0
    image_input: str = "none"
    latent_channels: int = 16
    num_train_timesteps: int = 1000
    guidance: str = "cfg"
    max_sequence_length: int = 512
    experts: int = 1

    @property
    def pixel_multiple(self) -> int:
        """Height and width must be multiples of this (VAE stride x patch size)."""
        return self.vae_scale_spatial * max(self.patch_size[1], self.patch_size[2])

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.vae_scale_temporal + 1

    def num_tokens(self, height: int, width: int, num_frames: int) -> int:
        """Video tokens the DiT sees for one video of this size."""
        pt, ph, pw = self.patch_size
        frames = self.latent_frames(num_frames) // pt
        h = height // self.vae_scale_spatial // ph
        w = width // self.vae_scale_spatial // pw
        return frames * h * w
