"""The selector service: scored tracks → training sets (``python -m services.selector``)."""

from services.selector._build import build
from services.selector._service import SelectorServicer, SelectorSettings, SelectorState

__all__ = ["SelectorServicer", "SelectorSettings", "SelectorState", "build"]
