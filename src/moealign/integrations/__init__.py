"""Integrations with other libraries' models (Hugging Face transformers: :mod:`.hf`)."""
