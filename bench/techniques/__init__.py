"""One module per technique; each calls ``bench.registry.register`` at import."""
