"""elastic-moe shared core: ModelSpec, checkpoint reader, placement, demo model."""

__version__ = "0.1.0"
