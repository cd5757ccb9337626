"""Server: the coordinator that trains the shared backbone, and its checkpoints."""

from .coordinator import Coordinator

__all__ = ["Coordinator"]
