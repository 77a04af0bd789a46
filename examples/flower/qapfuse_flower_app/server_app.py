"""ServerApp of the qapfuse Flower App (see qapfuse.fusion.flower.server_app)."""

from qapfuse.fusion.flower import server_app

app = server_app()
