"""The CLIP vision encoder of Wan2.1 image-to-video: transformers' ``CLIPVisionModel``
loaded through our loader, and its image processor from the checkpoint's
``image_processor`` folder. The DiT reads the penultimate hidden states, as diffusers'
``WanImageToVideoPipeline.encode_image`` gives them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastvideo.models.loader import checkpoint_files, load_checkpoint, meta_module
from fastvideo.models.registry import read_json
from fastvideo.pipelines.base import PipelineRuntime


def component_class(model_dir: Path, name: str) -> str:
    """The transformers class model_index.json names for component ``name``."""
    entry = read_json(model_dir / "model_index.json").get(name)
    if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[1], str):
        raise ValueError(f"{model_dir / 'model_index.json'} names no {name} class")
    return entry[1]


class WanImageEncoder:
    """PIL images -> CLIP penultimate hidden states ``[B, tokens, dim]`` in ``dtype``.

    Each image is processed and encoded on its own, as diffusers does for its one image per
    call, so a batched request gets the same states as a single one.
    """

    def __init__(self, processor: Any, model: torch.nn.Module, dtype: torch.dtype):
        self.processor = processor
        self.model = model
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, images: list[Any]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        states = []
        for image in images:
            pixels = self.processor(images=image, return_tensors="pt").pixel_values
            out = self.model(pixel_values=pixels.to(device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
        return torch.cat(states).to(self.dtype)


def _materialise_position_ids(model: torch.nn.Module, device: torch.device) -> None:
    """CLIP's ``position_ids`` is a non-persistent buffer: not in the checkpoint, so it is
    still on meta after loading; it is ``arange(num_positions)``."""
    for module in model.modules():
        ids = getattr(module, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_meta and hasattr(module, "num_positions"):
            positions = torch.arange(module.num_positions, device=device).expand((1, -1))
            module.register_buffer("position_ids", positions, persistent=False)
    left = [name for name, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"image encoder buffers left unloaded: {', '.join(left)}")


def load_clip_vision(
    folder: Path, class_name: str, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    """A transformers vision encoder built on meta and filled from ``folder``.

    Checkpoints written by transformers 4 name CLIPVisionModel's tensors
    ``vision_model.*``; transformers 5 builds the model without that level (and maps the
    names when it loads). Either layout is read here, unchanged on disk.
    """
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise ValueError(f"{folder}: transformers has no image encoder class {class_name!r}")
    config = transformers.AutoConfig.from_pretrained(str(folder))
    model = meta_module(lambda: cls(config))
    prefix = "vision_model."
    own = set(model.state_dict())
    file_keys = set(checkpoint_files(folder))
    target: torch.nn.Module = model
    if not own & file_keys and all(k.startswith(prefix) for k in file_keys):
        target = torch.nn.Module()
        target.vision_model = model  # the file's extra level of names
    load_checkpoint(target, folder, device, lambda name: dtype)
    _materialise_position_ids(model, device)
    return model.eval()


def load_image_encoder(folder: Path, env: PipelineRuntime) -> WanImageEncoder | None:
    """The CLIP encoder and its processor; None when the DiT has no image branch (Wan2.2
    I2V and TI2V condition on VAE latents only)."""
    model_dir = folder.parent
    dit = read_json(model_dir / "transformer" / "config.json")
    if dit.get("image_dim") is None:
        return None
    import transformers

    model = load_clip_vision(
        folder, component_class(model_dir, "image_encoder"), env.dtypes["text_encoder"], env.device
    )
    processor_class = component_class(model_dir, "image_processor")
    # The class model_index.json names may be one transformers exports only lazily or under
    # another name (e.g. CLIPImageProcessorPil); its own config names the processor type.
    processor_cls = getattr(transformers, processor_class, None) or transformers.AutoImageProcessor
    try:
        processor = processor_cls.from_pretrained(str(model_dir / "image_processor"))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{model_dir}: cannot load the image processor {processor_class!r}: {e}"
        ) from None
    # The DiT takes the states in its own dtype (diffusers casts them to it).
    return WanImageEncoder(processor, model, env.dtypes["transformer"])
