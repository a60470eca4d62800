"""evaluation room of markup2image."""
