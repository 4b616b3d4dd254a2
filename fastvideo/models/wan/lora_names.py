"""Wan's original module names (the ones community LoRA files use) for ours.

Ours are diffusers': ``self_attn.q/k/v/o`` -> ``attn1.to_q/to_k/to_v/to_out.0``,
``cross_attn.*`` -> ``attn2.*``, ``ffn.0`` / ``ffn.2`` -> ``ffn.net.0.proj`` / ``ffn.net.2``,
Wan's ``norm3`` -> our ``norm2`` (and back), ``modulation`` -> ``scale_shift_table``,
``text_embedding.0/2`` / ``time_embedding.0/2`` ->
``condition_embedder.{text,time}_embedder.linear_1/2``, ``time_projection.1`` ->
``condition_embedder.time_proj``, ``head.head`` -> ``proj_out``.
"""

from __future__ import annotations

import re

# (our name, Wan's original name) patterns, applied to our names to get Wan's.
_TO_WAN = [
    (r"^blocks\.(\d+)\.attn1\.to_q$", r"blocks.\1.self_attn.q"),
    (r"^blocks\.(\d+)\.attn1\.to_k$", r"blocks.\1.self_attn.k"),
    (r"^blocks\.(\d+)\.attn1\.to_v$", r"blocks.\1.self_attn.v"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0$", r"blocks.\1.self_attn.o"),
    (r"^blocks\.(\d+)\.attn1\.(norm_[qk])$", r"blocks.\1.self_attn.\2"),
    (r"^blocks\.(\d+)\.attn2\.to_q$", r"blocks.\1.cross_attn.q"),
    (r"^blocks\.(\d+)\.attn2\.to_k$", r"blocks.\1.cross_attn.k"),
    (r"^blocks\.(\d+)\.attn2\.to_v$", r"blocks.\1.cross_attn.v"),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0$", r"blocks.\1.cross_attn.o"),
    (r"^blocks\.(\d+)\.attn2\.(norm_[qk])$", r"blocks.\1.cross_attn.\2"),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj$", r"blocks.\1.ffn.0"),
    (r"^blocks\.(\d+)\.ffn\.net\.2$", r"blocks.\1.ffn.2"),
    (r"^blocks\.(\d+)\.norm2$", r"blocks.\1.norm3"),  # Wan's norm3 is the cross-attn norm
    (r"^blocks\.(\d+)\.norm3$", r"blocks.\1.norm2"),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^condition_embedder\.text_embedder\.linear_1$", "text_embedding.0"),
    (r"^condition_embedder\.text_embedder\.linear_2$", "text_embedding.2"),
    (r"^condition_embedder\.time_embedder\.linear_1$", "time_embedding.0"),
    (r"^condition_embedder\.time_embedder\.linear_2$", "time_embedding.2"),
    (r"^condition_embedder\.time_proj$", "time_projection.1"),
    (r"^proj_out$", "head.head"),
    (r"^scale_shift_table$", "head.modulation"),
]
_TO_WAN_COMPILED = [(re.compile(a), b) for a, b in _TO_WAN]


def wan_name(name: str) -> str | None:
    """Wan's original name of one of our (diffusers-named) modules or parameters."""
    for pattern, replacement in _TO_WAN_COMPILED:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return None
