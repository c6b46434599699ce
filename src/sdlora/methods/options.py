"""Checking a run's ``method`` section against the registered methods: the name must be registered and the
options must fit the method's options dataclass (``config`` cannot do this: it sits below the methods).
"""

from __future__ import annotations

from typing import Any

from ..config import RunConfig, load_config
from ..configtools import ConfigError, to_dict
from .base import METHODS, parse_options

__all__ = ["load_run_config", "resolve_method_config"]


def resolve_method_config(cfg: RunConfig) -> RunConfig:
    """Check ``method.name`` against the registry and ``method.options`` against the method's options dataclass,
    filling the options' defaults in place (so the saved config lists every option), and apply the registry
    entry's settings of ``method.adapter``/``method.align``/``method.calib`` (``Method.make_adapter_config``,
    ``make_align_config``, ``make_calib_config``).
    Returns ``cfg``.

    Raises:
        ConfigError: unknown method (the message lists the registered ones) or bad options (with the key path).
    """
    name = cfg.method.name
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}", "method.name")
    cls = METHODS[name]
    cfg.method.options = to_dict(parse_options(cls, cfg.method.options))
    # The registry entry's fixed settings (the variants' adapter, sdlora_ca's alignment, sdlora_calib's head), so
    # that the saved config says what the run does; the method applies them again (idempotent) when it is built
    # from a bare config.
    cfg.method.adapter = cls.make_adapter_config(cfg.method.adapter)
    cfg.method.align = cls.make_align_config(cfg.method.align)
    cfg.method.calib = cls.make_calib_config(cfg.method.calib)
    return cfg


def with_legacy_options(data: dict[str, Any]) -> dict[str, Any]:
    """A saved run config's data with the method options it lacks set to what the run used before they existed
    (the options class's ``LEGACY`` values, for an option whose default differs from the old behaviour); without
    this they would be filled with today's default and an old run would pass for, or continue as, a new one."""
    method = data.get("method")
    if not isinstance(method, dict) or method.get("name") not in METHODS:
        return data
    legacy = getattr(METHODS[method["name"]].options_class, "LEGACY", {})
    options = method.get("options") or {}
    missing = {k: v for k, v in legacy.items() if k not in options} if isinstance(options, dict) else {}
    if not missing:
        return data
    return {**data, "method": {**method, "options": {**options, **missing}}}


def load_run_config(
    name_or_path: str, overrides: list[str] | None = None, *, saved_run: bool = False
) -> tuple[RunConfig, dict[str, Any]]:
    """:func:`sdlora.config.load_config` with the method checked and its options' defaults filled in
    (:func:`resolve_method_config`): the config as a run uses and saves it. ``saved_run``: the file is a run
    directory's ``config.yaml`` (:func:`with_legacy_options` applies).

    Returns:
        The typed config and its plain-data form (what is written to the run directory).

    Raises:
        ConfigError: as ``load_config``, also for an unknown method or bad method options, attributed to the file
            or to the ``--set`` override that set the value.
    """
    prepare = with_legacy_options if saved_run else None
    return load_config(name_or_path, overrides, check=resolve_method_config, prepare=prepare)
