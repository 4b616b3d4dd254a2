"""Image conditioning of the Wan family, computed once on the output rank and broadcast.

Two ways an image enters the denoising loop, as in diffusers' ``WanImageToVideoPipeline``:

* ``"concat"`` (Wan2.1 I2V, Wan2.2 I2V-A14B): the video ``[image, 0, 0, ...]`` is VAE-encoded
  and normalised, a 4-channel temporal mask (1 on the first latent frame) is put in front,
  and those ``4 + z`` channels are concatenated to the noisy latents as DiT input.
* ``"first_frame"`` (Wan2.2 TI2V, ``expand_timesteps``): the image alone is VAE-encoded;
  its latent replaces the first latent frame of the DiT input, whose tokens get timestep 0.

Either way the image is first resized to the request's (height, width) exactly as diffusers'
``VideoProcessor.preprocess`` does for a PIL image (Lanczos, no crop, to [-1, 1]). With a
CLIP encoder (Wan2.1 I2V) the original image's penultimate CLIP states become the DiT's
``image`` input, shared by the conditional and unconditional passes.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from fastvideo.layers.sequence import patchify, take_shard
from fastvideo.models.wan.image_encoder import WanImageEncoder
from fastvideo.pipelines.base import ForwardBatch, PipelineRuntime, PipelineStage, StepControl
from fastvideo.pipelines.stages.decoding import VideoDecoder

CONDITION_MODES = ("concat", "first_frame")
# ForwardBatch.item_tensors keys (per item, this rank's tokens).
CONDITION = "wan_condition"  # [B, L_shard, P*C_cond] condition tokens
NOISE_MASK = "wan_noise_mask"  # [B, L_shard, P*z]: 1 where the latents are denoised


def to_pil(image: torch.Tensor):
    """uint8 [H, W, 3] -> PIL RGB image."""
    from PIL import Image

    return Image.fromarray(image.numpy(), mode="RGB")


def preprocess_image(image, height: int, width: int) -> torch.Tensor:
    """PIL image -> [1, 3, height, width] fp32 in [-1, 1], as diffusers' VideoProcessor does
    it (Lanczos resize to the exact size, RGB, /255, *2 - 1)."""
    from PIL import Image

    resized = image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)
    array = np.array(resized.convert("RGB")).astype(np.float32) / 255.0
    pixels = torch.from_numpy(array[None].transpose(0, 3, 1, 2))
    return 2.0 * pixels - 1.0


class VideoEncoder(VideoDecoder, Protocol):
    """What the stage needs of a family's VAE (encode as well as decode)."""

    z_dim: int

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def normalize_latents(self, mean_latents: torch.Tensor) -> torch.Tensor: ...


class ImageConditioningStage(PipelineStage):
    """Builds this rank's condition tokens (and CLIP states) for a batch with images.

    Runs after latent preparation (it needs the token grid and this rank's shard); a batch
    without images (TI2V text-to-video) passes through untouched.
    """

    name = "image_conditioning"

    def __init__(
        self,
        env: PipelineRuntime,
        mode: str,
        vae: VideoEncoder | None,
        image_encoder: WanImageEncoder | None = None,
        clip_states: bool = False,
    ):
        if mode not in CONDITION_MODES:
            raise ValueError(f"condition mode must be one of {CONDITION_MODES}, got {mode!r}")
        self.env = env
        self.mode = mode
        self.vae = vae  # None on ranks that never lead a replica
        self.image_encoder = image_encoder  # None on ranks that never lead a replica
        self.clip_states = clip_states  # the DiT takes CLIP image states (Wan2.1 I2V)

    # --- shapes, known on every rank -----------------------------------------------------
    def _condition_shape(self, batch: ForwardBatch) -> tuple[int, ...]:
        spec, first = self.env.spec, batch.first
        frames = spec.latent_frames(first.num_frames) if self.mode == "concat" else 1
        channels = spec.latent_channels + (4 if self.mode == "concat" else 0)
        h, w = first.height // spec.vae_scale_spatial, first.width // spec.vae_scale_spatial
        return (batch.batch_size, channels, frames, h, w)

    # --- the output rank's work ----------------------------------------------------------
    def _encode_image(self, pixels: torch.Tensor, num_frames: int) -> torch.Tensor:
        """[1, 3, H, W] in [-1, 1] -> normalised latents [1, z, F', h, w] (fp32): the video
        [image, zeros...] (concat) or the image alone (first_frame), encoded to its mode."""
        assert self.vae is not None, "the output rank loads the VAE"
        image = pixels.unsqueeze(2)
        if self.mode == "concat":
            zeros = image.new_zeros(1, 3, num_frames - 1, *image.shape[3:])
            image = torch.cat([image, zeros], dim=2)
        moments = self.vae.encode(image.to(self.env.device, self.vae.dtype))
        return self.vae.normalize_latents(moments[:, : self.vae.z_dim].float())

    def _temporal_mask(self, like: torch.Tensor) -> torch.Tensor:
        """[1, 4, F', h, w]: 1 on the first latent frame (its 4 time slots), 0 after it —
        the values diffusers' prepare_latents builds from its per-frame mask."""
        mask = torch.zeros(1, self.env.spec.vae_scale_temporal, *like.shape[2:])
        mask[:, :, 0] = 1.0
        return mask.to(like.device)

    def _compute(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        first = batch.first
        conditions, images = [], []
        for item in batch.items:
            image = to_pil(item.image)
            images.append(image)
            latents = self._encode_image(
                preprocess_image(image, first.height, first.width), first.num_frames
            )
            if self.mode == "concat":
                latents = torch.cat([self._temporal_mask(latents), latents], dim=1)
            conditions.append(latents)
        states = None
        if self.clip_states:
            assert self.image_encoder is not None, "the output rank loads the image encoder"
            states = self.image_encoder(images)
        return torch.cat(conditions), states

    # --- every rank ----------------------------------------------------------------------
    def __call__(self, batch: ForwardBatch, control: StepControl) -> ForwardBatch:
        if batch.first.image is None:
            return batch
        assert batch.grid is not None and batch.shard is not None
        device, runtime = self.env.device, self.env.runtime
        replica = runtime.groups.replica
        states = None
        if self.env.is_output_rank:
            condition, states = self._compute(batch)
            condition = condition.to(device).contiguous()
        else:
            condition = torch.empty(self._condition_shape(batch), device=device)
        runtime.broadcast_(replica, condition)
        if self.clip_states:
            states = self._broadcast_states(states)
            batch.conditioning["image"] = states
            if batch.do_cfg:  # the unconditional pass sees the same image
                batch.negative_conditioning["image"] = states
        self._shard(batch, condition)
        return batch

    def _broadcast_states(self, states: torch.Tensor | None) -> torch.Tensor:
        """The output rank's CLIP states [B, L_img, D] on every rank (their shape is sent
        first: it depends on the encoder's config, which only the output rank loads)."""
        device, runtime = self.env.device, self.env.runtime
        replica = runtime.groups.replica
        shape = torch.zeros(3, dtype=torch.int64, device=device)
        if states is not None:
            shape.copy_(torch.tensor(states.shape))
        runtime.broadcast_(replica, shape)
        if states is None:
            dtype = self.env.dtypes["transformer"]
            states = torch.empty(tuple(shape.tolist()), dtype=dtype, device=device)
        return runtime.broadcast_(replica, states.to(device).contiguous())

    def _shard(self, batch: ForwardBatch, condition: torch.Tensor) -> None:
        """Condition [B, C, F', h, w] -> this rank's tokens in ``batch.item_tensors``."""
        patch = self.env.spec.patch_size
        shard = batch.shard
        assert shard is not None
        if self.mode == "concat":
            batch.item_tensors[CONDITION] = take_shard(patchify(condition, patch), shard)
            return
        # first_frame: diffusers' (1 - mask) * condition + mask * latents over the video,
        # the one-frame condition broadcast along time and the mask 0 on latent frame 0.
        b, z, _, h, w = condition.shape
        frames = batch.grid.frames * patch[0]  # type: ignore[union-attr]
        mask = torch.ones(1, z, frames, h, w, device=condition.device)
        mask[:, :, 0] = 0.0
        video = condition.expand(b, z, frames, h, w)
        batch.item_tensors[CONDITION] = take_shard(patchify(video, patch), shard)
        mask_tokens = take_shard(patchify(mask, patch), shard)
        batch.item_tensors[NOISE_MASK] = mask_tokens.expand(b, -1, -1).contiguous()
