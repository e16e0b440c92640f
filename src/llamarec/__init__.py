"""llamarec: LLM-based two-stage recommendation (retrieve with a sequential model, rank with an LLM)."""

__version__ = "0.1.0"

__all__ = ["Recommender"]


def __getattr__(name: str):
    # Imported lazily so that `import llamarec` stays light (no torch/transformers until needed).
    if name == "Recommender":
        from llamarec.pipeline import Recommender

        return Recommender
    raise AttributeError(f"module 'llamarec' has no attribute {name!r}")
