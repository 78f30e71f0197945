"""Layer 1: retrieval: documents, chunks, BM25 over Korean morphemes and dense search, passages for prompts. Imports
only from core (and its sibling judge for the morpheme tokenizer)."""
