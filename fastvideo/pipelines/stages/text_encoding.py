"""Encode prompts (and CFG's negative prompts) once, on the output rank, and broadcast
the states to every rank: the text encoder is loaded on one rank only."""

from __future__ import annotations

import torch

from fastvideo.models.text_encoders import encode_prompts
from fastvideo.pipelines.base import ForwardBatch, PipelineRuntime, PipelineStage, ProgressFn


class TextEncodingStage(PipelineStage):
    name = "text_encoding"

    def __init__(self, tokenizer, text_encoder, env: PipelineRuntime, text_dim: int):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.env = env
        self.text_dim = text_dim

    def __call__(self, batch: ForwardBatch, progress: ProgressFn) -> ForwardBatch:
        prompts = list(batch.prompts)
        if batch.do_cfg:
            prompts += batch.negative_prompts
        shape = (len(prompts), self.env.spec.text_max_length, self.text_dim)
        dtype = self.env.dtypes["transformer"]
        if self.env.is_output_rank:
            states = encode_prompts(self.tokenizer, self.text_encoder, prompts, shape[1], dtype).to(
                self.env.device
            )
        else:
            states = torch.empty(shape, dtype=dtype, device=self.env.device)
        self.env.runtime.broadcast_(self.env.runtime.groups.replica, states)
        batch.prompt_embeds = states[: batch.batch_size]
        if batch.do_cfg:
            batch.negative_prompt_embeds = states[batch.batch_size :]
        return batch
