"""Torch-free sampling from an exported folder (numpy + onnxruntime + tokenizers + Pillow)."""
