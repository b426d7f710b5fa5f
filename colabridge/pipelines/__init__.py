"""Thin ``DiffusionPipeline`` front-ends over the shared engine."""

from .lora_mixin import ColaLoraLoaderMixin
from .pipeline_cola import ColaPipeline, ColaPipelineOutput, ColaStreamChunk, load_tokenizer

__all__ = ["ColaLoraLoaderMixin", "ColaPipeline", "ColaPipelineOutput", "ColaStreamChunk", "load_tokenizer"]
from .pipeline_image import (  # noqa: E402  (image bridge: text → image prior, image → caption)
    ColaCaptionPipeline, ColaCaptionPipelineOutput, ColaImagePipelineOutput, ColaImagePriorPipeline,
)

__all__ += ["ColaCaptionPipeline", "ColaCaptionPipelineOutput", "ColaImagePipelineOutput", "ColaImagePriorPipeline"]
from .pipeline_clip_prior import ColaClipPriorPipeline, ColaClipPriorPipelineOutput  # noqa: E402  (text → CLIP embedding prior)

__all__ += ["ColaClipPriorPipeline", "ColaClipPriorPipelineOutput"]
