"""mgjax: MusicGen in JAX/Flax. Public API: `convert_checkpoint`, `MusicGen`, `Codec` (see DESIGN.md)."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["convert_checkpoint", "Codec", "MusicGen", "load_config"]


def __getattr__(name):
    # Lazy, so `python -m mgjax.convert --help` and config tooling do not pay for importing every model.
    if name == "convert_checkpoint":
        from mgjax.convert import convert_checkpoint
        return convert_checkpoint
    if name == "Codec":
        from mgjax.codec.encodec import Codec
        return Codec
    if name == "MusicGen":
        from mgjax.api import MusicGen
        return MusicGen
    if name == "load_config":
        from mgjax.config import load_config
        return load_config
    raise AttributeError(f"module 'mgjax' has no attribute {name!r}")
