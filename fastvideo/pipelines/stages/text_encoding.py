"""Encode prompts (and CFG's negative prompts) once, on the output rank, and broadcast
the resulting tensors to every rank: text encoders are loaded on one rank only.

A family gives the stage a ``PromptEncoder`` (loaded on the ranks that lead a replica) and,
for every rank, the names, shapes and dtypes of what it returns (``output_spec``), so the
other ranks can receive them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from fastvideo.pipelines.base import ForwardBatch, PipelineRuntime, PipelineStage, StepControl
from fastvideo.wire.messages import RequestItem

# n prompts -> {name: (shape, dtype)} of the encoder's outputs, batch first.
OutputSpec = Callable[[int, RequestItem], dict[str, tuple[tuple[int, ...], torch.dtype]]]


class PromptEncoder(Protocol):
    def __call__(self, prompts: list[str], item: RequestItem) -> dict[str, torch.Tensor]:
        """Prompts -> named tensors [len(prompts), ...] (``item``: the batch's shared
        settings, e.g. max_sequence_length)."""
        ...


class TextEncodingStage(PipelineStage):
    name = "text_encoding"

    def __init__(self, encode: PromptEncoder | None, env: PipelineRuntime, spec: OutputSpec):
        self.encode = encode  # None on ranks that never lead a replica
        self.env = env
        self.spec = spec

    def __call__(self, batch: ForwardBatch, control: StepControl) -> ForwardBatch:
        prompts = [item.prompt for item in batch.items]
        if batch.do_cfg:
            prompts += [item.negative_prompt for item in batch.items]
        spec = self.spec(len(prompts), batch.first)
        device = self.env.device
        if self.env.is_output_rank:
            assert self.encode is not None, "the output rank loads the text encoder"
            out = self.encode(prompts, batch.first)
            if set(out) != set(spec):
                raise ValueError(f"text encoder returned {sorted(out)}, expected {sorted(spec)}")
            states = {}
            for name, (shape, dtype) in spec.items():
                if tuple(out[name].shape) != tuple(shape):
                    raise ValueError(f"text encoder {name}: {tuple(out[name].shape)} != {shape}")
                states[name] = out[name].to(device=device, dtype=dtype).contiguous()
        else:
            states = {n: torch.empty(s, dtype=d, device=device) for n, (s, d) in spec.items()}
        replica = self.env.runtime.groups.replica
        for name in sorted(states):  # the same order on every rank
            self.env.runtime.broadcast_(replica, states[name])
        b = batch.batch_size
        batch.conditioning.update({n: t[:b] for n, t in states.items()})
        if batch.do_cfg:
            batch.negative_conditioning.update({n: t[b:] for n, t in states.items()})
        return batch
