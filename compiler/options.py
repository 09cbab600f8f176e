"""The compiler's switches and its one error type."""

from dataclasses import dataclass

__all__ = ["CompileError", "CompileOptions"]


class CompileError(ValueError):
    """The model cannot be compiled for this configuration (the message names the buffer, what was needed
    and what the configuration has)."""


@dataclass(frozen=True, kw_only=True)
class CompileOptions:
    """Switches and limits of the compiler.

    intra_operation, inter_operation : bool
        The two buffer-management strategies (docs/compiler.md).
    max_block_tokens : int or None
        At most this many tokens on chip at once (default: as many as the buffers hold).
    max_weight_lines : int or None
        Use at most this many weight-buffer lines for matrix tiles (default: all that the parameters
        leave); smaller values force weight streaming and chunk splitting (for tests).
    max_scan_tiles : int or None
        At most this many channel tiles of ``R`` channels per scan group (default: as many as the state
        buffer holds); fewer than all forces the grouped scan (for tests).
    max_group_lines : int or None
        At most this many lines of ``d_inner`` per channel group (default: as many as fit); smaller
        values force the channel-grouped mixer that large models need on small buffers (for tests).
    stream_rows : bool
        Stream the mixer's and the LM head's input rows in chunks and write their outputs in groups of
        row tiles, and run RMSNorm in one-line chunks of d_model, even when they fit on chip (the paths of
        models whose d_model does not fit; for tests).
    """

    intra_operation: bool = True
    inter_operation: bool = True
    max_block_tokens: int | None = None
    max_weight_lines: int | None = None
    max_scan_tiles: int | None = None
    max_group_lines: int | None = None
    stream_rows: bool = False

    def __post_init__(self):
        for name in ("intra_operation", "inter_operation", "stream_rows"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, not {getattr(self, name)!r}")
        for name in ("max_block_tokens", "max_weight_lines", "max_scan_tiles", "max_group_lines"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, not {value!r}")
