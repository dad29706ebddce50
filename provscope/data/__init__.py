"""Data files shipped with provscope (the demo corpus)."""
