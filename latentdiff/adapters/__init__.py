"""Adapters: LoRA / LyCORIS, textual-inversion embeddings."""
