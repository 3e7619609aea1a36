"""Exporting a training checkpoint to other formats: `fpa-export hf` (Hugging Face transformers)."""
