"""text room of markup2image."""
