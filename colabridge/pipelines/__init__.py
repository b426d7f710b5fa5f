"""Thin ``DiffusionPipeline`` front-ends over the shared engine."""

from .pipeline_cola import ColaPipeline, ColaPipelineOutput, load_tokenizer

__all__ = ["ColaPipeline", "ColaPipelineOutput", "load_tokenizer"]
