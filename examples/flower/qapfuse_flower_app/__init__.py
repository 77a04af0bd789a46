"""qapfuse Flower App."""
