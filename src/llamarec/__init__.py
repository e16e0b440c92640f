"""llamarec: LLM-based two-stage recommendation (retrieve with a sequential model, rank with an LLM)."""

__version__ = "0.1.0"
