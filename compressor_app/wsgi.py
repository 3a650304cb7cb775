import os

from django.core.wsgi import get_wsgi_application
from django.urls import get_resolver

from compressor_app.gate import FairGate

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "compressor_app.settings")
application = get_wsgi_application()
# The URLconf (views, DRF, serializers) is imported at start, not in the first request each web worker serves.
get_resolver().url_patterns  # noqa: B018 - imported for its effect
# Two requests per process run the app at once, the others wait their turn (compressor_app.gate); 0: no gate.
_places = int(os.environ.get("WEB_GATE_PLACES", "2"))
if _places > 0:
    application = FairGate(application, places=_places, max_wait_s=float(os.environ.get("WEB_GATE_MAX_WAIT_S", "0.5")))
