"""Continual-learning methods behind one registry (``METHODS``); importing this package registers them."""

from . import sdlora  # noqa: F401  (registers sdlora, sdlora_rr, sdlora_kd)
from .base import METHODS, Method, TaskContext, create_method, register_method

__all__ = ["METHODS", "Method", "TaskContext", "create_method", "register_method"]
