"""The admin REST API (FastAPI): studies, queue, exports, audit trail, research predictions."""

from triagenode.api.app import create_app
from triagenode.api.services import ApiServices, Predictor

__all__ = ["ApiServices", "Predictor", "create_app"]
