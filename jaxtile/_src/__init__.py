"""jaxtile's implementation. Private: the public surface is `jaxtile`'s `__all__`."""
