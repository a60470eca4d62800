"""models room of markup2image."""
