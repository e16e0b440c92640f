"""Stage 1 of LlamaRec: sequential recommenders that retrieve candidate items."""
