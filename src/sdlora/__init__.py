"""sdlora: SD-LoRA (Scalable Decoupled Low-Rank Adaptation) for class-incremental learning."""

__version__ = "0.1.0"
