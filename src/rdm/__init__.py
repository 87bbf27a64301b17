"""rdm: retrieval-augmented diffusion models (Blattmann, Rombach et al., NeurIPS 2022)."""

__version__ = "0.1.0"
