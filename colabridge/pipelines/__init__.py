"""Thin ``DiffusionPipeline`` front-ends over the shared engine."""

from .pipeline_cola import ColaPipeline, ColaPipelineOutput, ColaStreamChunk, load_tokenizer

__all__ = ["ColaPipeline", "ColaPipelineOutput", "ColaStreamChunk", "load_tokenizer"]
