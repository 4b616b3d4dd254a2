"""The token grid of one video: what sparse video attention needs to lay out its tiles."""

from __future__ import annotations

from typing import NamedTuple


class TokenGrid(NamedTuple):
    """Post-patch grid sizes of one video: ``frames x height x width`` tokens."""

    frames: int
    height: int
    width: int

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width
