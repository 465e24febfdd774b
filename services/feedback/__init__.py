"""The feedback service: ratings and listens → track scores (``python -m services.feedback``)."""

from services.feedback._build import build
from services.feedback._service import FeedbackServicer, FeedbackSettings, FeedbackState

__all__ = ["FeedbackServicer", "FeedbackSettings", "FeedbackState", "build"]
