"""LatentWire: a shared compressed interlingua that several frozen LLMs read through `inputs_embeds`.

`from latentwire import Interlingua` is the inference API (see `latentwire/api.py`); it is imported on first use
so that `import latentwire` (and every submodule import) stays light.
"""

__all__ = ["Interlingua"]


def __getattr__(name: str):
    if name == "Interlingua":
        from latentwire.api import Interlingua

        return Interlingua
    raise AttributeError(f"module 'latentwire' has no attribute {name!r}")
