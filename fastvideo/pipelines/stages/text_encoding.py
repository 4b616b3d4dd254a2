"""Encode prompts (and CFG's negative prompts) once, on the output rank, and broadcast
the states to every rank: the text encoder is loaded on one rank only."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastvideo.pipelines.base import ForwardBatch, PipelineRuntime, PipelineStage, StepControl

# prompts -> [len(prompts), max_length, text_dim] states (the family's text encoder).
TextEncoder = Callable[[list[str]], torch.Tensor]


class TextEncodingStage(PipelineStage):
    name = "text_encoding"

    def __init__(
        self, encode: TextEncoder | None, env: PipelineRuntime, text_dim: int, max_length: int
    ):
        self.encode = encode  # None on ranks that never lead a replica
        self.env = env
        self.text_dim = text_dim
        self.max_length = max_length

    def __call__(self, batch: ForwardBatch, control: StepControl) -> ForwardBatch:
        prompts = [item.prompt for item in batch.items]
        if batch.do_cfg:
            prompts += [item.negative_prompt for item in batch.items]
        shape = (len(prompts), self.max_length, self.text_dim)
        dtype = self.env.dtypes["transformer"]
        if self.env.is_output_rank:
            assert self.encode is not None, "the output rank loads the text encoder"
            states = self.encode(prompts).to(device=self.env.device, dtype=dtype)
        else:
            states = torch.empty(shape, dtype=dtype, device=self.env.device)
        self.env.runtime.broadcast_(self.env.runtime.groups.replica, states)
        batch.prompt_embeds = states[: batch.batch_size]
        if batch.do_cfg:
            batch.negative_prompt_embeds = states[batch.batch_size :]
        return batch
