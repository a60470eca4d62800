"""markup2image: markup-to-image diffusion (FSA-CDM, SS-DM, DDPM, HCMA-style alignment)."""

__version__ = "0.1.0"
