"""data room of markup2image."""
