"""ClientApp of the qapfuse Flower App (see qapfuse.fusion.flower.client_app)."""

from qapfuse.fusion.flower import client_app

app = client_app()
