"""export room of markup2image."""
