import os

from django.core.wsgi import get_wsgi_application
from django.urls import get_resolver

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "compressor_app.settings")
application = get_wsgi_application()
# The URLconf (views, DRF, serializers) is imported at start, not in the first request each web worker serves.
get_resolver().url_patterns  # noqa: B018 - imported for its effect
