"""HTTP service for the spiking detectors (FastAPI): detect, streaming, video, live frames, web page, metrics.

Only the public library API is used (``detector.weights``, ``detector.models``). Start it with
``casc serve --model NAME|PATH``; build an app in-process with ``service.app.create_app``.
"""

from .config import Settings

__all__ = ["Settings"]
