"""xlserve's serving side: the offline pipeline, the engine, the text layer and the HTTP server."""

from serving.engine.request import GenerationConfig
from serving.pipeline import Pipeline, Response, pipeline

__all__ = ["GenerationConfig", "Pipeline", "Response", "pipeline"]
