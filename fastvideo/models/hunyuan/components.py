"""How each HunyuanVideo component is read from its folder of a diffusers-layout checkpoint,
and the prompt encoder the text-encoding stage runs."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fastvideo.models.hunyuan.text import encode_prompt
from fastvideo.models.hunyuan.transformer import HunyuanTransformer3D, HunyuanTransformerConfig
from fastvideo.models.hunyuan.vae import HunyuanVAE, HunyuanVAEConfig
from fastvideo.models.loader import load_checkpoint, meta_module
from fastvideo.models.registry import read_json
from fastvideo.models.samplers import FlowMatchEulerScheduler, build_scheduler
from fastvideo.models.samplers.base import shift_flow_sigmas
from fastvideo.models.text_encoders import load_text_encoder, load_tokenizer
from fastvideo.pipelines.base import PipelineRuntime, prepare_dit
from fastvideo.wire.messages import RequestItem

# Llama tokens the DiT attends to after the template's crop (diffusers' default).
TEXT_MAX_LENGTH = 256


def load_transformer(folder: Path, env: PipelineRuntime) -> HunyuanTransformer3D:
    config = HunyuanTransformerConfig.from_dict(read_json(folder / "config.json"))
    model = meta_module(lambda: HunyuanTransformer3D(config, env.runtime))
    dtype = env.dtypes["transformer"]  # diffusers keeps no fp32 parameter in this model
    model = load_checkpoint(model, folder, env.device, lambda name: dtype)
    return prepare_dit(model, env.settings)


def load_vae(folder: Path, env: PipelineRuntime) -> HunyuanVAE:
    config = HunyuanVAEConfig.from_dict(read_json(folder / "config.json"))
    model = meta_module(lambda: HunyuanVAE(config))
    dtype = env.dtypes["vae"]
    return load_checkpoint(model, folder, env.device, lambda name: dtype)


class HunyuanFlowEuler(FlowMatchEulerScheduler):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` as ``HunyuanVideoPipeline`` drives it:
    the pipeline passes ``sigmas = linspace(1, 0, steps + 1)[:-1]``, which the scheduler
    shifts once (not the scheduler's own twice-shifted schedule). Everything else, the
    Euler step included, is the parent's."""

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str = "cpu") -> None:
        """sigmas: float32 ``shift(linspace(1, 0, steps + 1)[:-1])`` and a final 0, [steps + 1]
        on the CPU; timesteps ``sigmas[:-1] * N_train`` (float32), [steps] on ``device``."""
        self._check_num_steps(num_inference_steps)
        # float32 numpy before the shift, exactly as diffusers rounds the given sigmas.
        base = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1].astype(np.float32)
        sigmas = torch.from_numpy(shift_flow_sigmas(base, self.shift)).to(torch.float32)
        self.timesteps = (sigmas * self.num_train_timesteps).to(device)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._step_index = 0


def load_sampler(folder: Path, env: PipelineRuntime) -> Callable[[], object]:
    """A factory: every request gets a fresh sampler (they hold per-request state)."""
    config = read_json(folder / "scheduler_config.json")
    name = config.get("_class_name", "")
    if name != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(
            f"{folder / 'scheduler_config.json'}: _class_name {name!r}; HunyuanVideo runs "
            f"FlowMatchEulerDiscreteScheduler only"
        )
    if env.settings.sampler not in (None, "euler", name):
        raise ValueError(
            f"scheduler={env.settings.sampler!r}: HunyuanVideo supports 'euler' (its flow "
            f"matching Euler sampler) or None"
        )
    # Validates every field as our Euler sampler does, then runs Hunyuan's schedule.
    build_scheduler(name, config, env.settings.flow_shift)
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    if env.settings.flow_shift is not None:
        fields["shift"] = env.settings.flow_shift
    return functools.partial(HunyuanFlowEuler, **fields)


# --- text ------------------------------------------------------------------------------------
def load_encoder(folder: Path, class_name: str, env: PipelineRuntime) -> nn.Module:
    """A transformers encoder loaded by our loader, with its non-persistent buffers filled.

    The loader builds on the meta device, and buffers that are not in the checkpoint
    (Llama's rotary ``inv_freq``, CLIP's ``position_ids``) would stay there: they are
    taken from a second construction whose parameters are on meta (no weight memory).
    """

    # The shared loader fills the buffers the checkpoint does not hold.
    return load_text_encoder(folder, class_name, env.dtypes["text_encoder"], env.device)


class HunyuanPromptEncoder:
    """prompts -> {"text": [n, L, 4096] Llama states of the templated prompt (cropped),
    "text_mask": [n, L] (1 = valid, right padding), "pooled": [n, 768] CLIP pooled}, with
    L = max_sequence_length (256 by default); sizes are the checkpoint's encoders'."""

    def __init__(self, llama_tokenizer, llama: nn.Module, clip_tokenizer, clip: nn.Module):
        self.llama_tokenizer, self.llama = llama_tokenizer, llama
        self.clip_tokenizer, self.clip = clip_tokenizer, clip

    def __call__(self, prompts: list[str], item: RequestItem) -> dict[str, torch.Tensor]:
        length = item.max_sequence_length or TEXT_MAX_LENGTH
        text, pooled, mask = encode_prompt(
            self.llama_tokenizer, self.llama, self.clip_tokenizer, self.clip, prompts,
            max_sequence_length=length,
        )  # fmt: skip
        return {"text": text, "text_mask": mask, "pooled": pooled}


def text_output_spec(config: HunyuanTransformerConfig, dtype: torch.dtype):
    """What HunyuanPromptEncoder returns for n prompts (known on every rank): the states in
    the DiT's dtype (as diffusers casts them), the mask as int64."""

    def spec(n: int, item: RequestItem) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        length = item.max_sequence_length or TEXT_MAX_LENGTH
        return {
            "text": ((n, length, config.text_embed_dim), dtype),
            "text_mask": ((n, length), torch.int64),
            "pooled": ((n, config.pooled_projection_dim), dtype),
        }

    return spec


def _encoder_class(model_dir: Path, component: str) -> str:
    entry = read_json(model_dir / "model_index.json").get(component)
    if not entry or len(entry) != 2:
        raise ValueError(f"{model_dir / 'model_index.json'} names no {component} component")
    return entry[1]


def load_prompt_encoder(folder: Path, env: PipelineRuntime) -> HunyuanPromptEncoder:
    """Both encoders and tokenizers (``text_encoder``/``tokenizer``: Llama,
    ``text_encoder_2``/``tokenizer_2``: CLIP) from the checkpoint folder of ``folder``."""
    root = folder.parent
    llama = load_encoder(folder, _encoder_class(root, "text_encoder"), env)
    clip = load_encoder(root / "text_encoder_2", _encoder_class(root, "text_encoder_2"), env)
    return HunyuanPromptEncoder(
        load_tokenizer(root / "tokenizer"), llama, load_tokenizer(root / "tokenizer_2"), clip
    )
