"""Data: read files, normalise formats, apply chat templates, tokenise with loss masks, batch."""
