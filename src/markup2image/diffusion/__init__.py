"""diffusion room of markup2image."""
