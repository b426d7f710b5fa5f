"""colabridge: continuous-latent language modelling (Cola DLM) as a diffusers citizen."""

from .models import ColaDiT, ColaTextVAE, KVCache

__version__ = "0.1.0"

__all__ = ["ColaDiT", "ColaTextVAE", "KVCache", "ColaPipeline", "ColaPipelineOutput", "__version__"]


def __getattr__(name):  # pipelines import transformers; load them on first use
    if name in ("ColaPipeline", "ColaPipelineOutput"):
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(name)
