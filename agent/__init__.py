"""provscope.agent: the node agent (collectors, local ingest, daemon), the pipeline that
also runs inside jobs, the in-job client and the PyTorch hooks."""

from provscope.agent.pipeline import BatchProcessor, Pipeline

__all__ = ["BatchProcessor", "Pipeline"]
