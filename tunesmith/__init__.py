"""tunesmith: fine-tune open causal language models end to end."""

__version__ = "0.1.0"
