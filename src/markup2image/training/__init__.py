"""training room of markup2image."""
