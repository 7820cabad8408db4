"""An OpenAI-compatible HTTP server: continuous batching over one static KV cache (`batcher`),
FastAPI routes in OpenAI's formats with server-sent events (`app`), and a chat page at `/`."""

from camelid.serve.app import create_app
from camelid.serve.batcher import Batcher, Event, Job, QueueFull

__all__ = ["Batcher", "Event", "Job", "QueueFull", "create_app"]
