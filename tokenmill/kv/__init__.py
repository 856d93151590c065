"""The KV cache: its layout, formats and capacity (cache.py); eviction policies plug in here."""
