"""Data files shipped inside the package (read them with importlib.resources)."""
