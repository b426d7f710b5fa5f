"""Cola models as diffusers ``ModelMixin`` + ``ConfigMixin`` classes.

This module path is recorded in ``model_index.json`` files: keep the class names importable from here.
"""

from diffusers import ConfigMixin, ModelMixin  # noqa: F401  (diffusers looks these names up on load)

from .cache import KVCache
from .dit import ColaDiT, ColaDiTOutput
from .text_vae import ColaTextVAE, TextLatentPosterior

__all__ = ["ColaDiT", "ColaDiTOutput", "ColaTextVAE", "KVCache", "TextLatentPosterior"]
