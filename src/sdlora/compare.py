"""``sdlora compare``: run several methods (and seeds) on one config, each into its own run directory, then tabulate.

Layout of ``--out DIR``::

    DIR/<method>/seed<seed>/      one ordinary run directory per (method, seed)
    DIR/compare.csv, compare.md   one row per method (``report.write_compare``)
    DIR/plots/compare_curves.png

``--methods all`` runs every registered method (``methods.METHODS``, sorted by name) and skips, with a note in
``compare.md``, a method that cannot work on the config's backbone (``methods.UnsupportedBackbone``: the prompt
methods on a text model); a method named explicitly that cannot is a failed run like any other. A config whose
``method.options`` belong to one method (the ``l2p_*`` presets) is refused for the others before anything runs:
use a config without options for ``all``.

Resumable: a finished run whose saved config equals the requested one is reused, an unfinished one is resumed
from its last checkpoint, and a failing run does not stop the others (the failures are reported together at the
end, after the table of the runs that finished). Bad input is different: every (method, seed) config is loaded and
checked before anything runs, and a config or data error found while building a run (a key-path ``ConfigError``,
missing data files) stops the compare at once, reported once instead of once per method and seed.

One compare at a time per ``--out``: the compare directory's lock (``rundir.run_dir_lock``) is held for the whole
compare, and each run directory's own lock for each run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .configtools import ConfigError

if TYPE_CHECKING:
    from .config import RunConfig

__all__ = ["run_compare", "run_dir_for"]

log = logging.getLogger(__name__)


def run_dir_for(out: str | os.PathLike, method: str, seed: int) -> Path:
    """The run directory of one (method, seed) pair inside a compare directory."""
    return Path(out) / method / f"seed{seed}"


def _one_run(cfg: RunConfig, cfg_dict: dict[str, Any], out: str | os.PathLike) -> Path:
    """Run, resume or reuse one (method, seed) whose config is already loaded; returns its run directory."""
    from .engine import run_experiment  # looked up per call, so a replaced engine.run_experiment is used
    from .rundir import RunError, config_changes, run_state

    run_dir = run_dir_for(out, cfg.method.name, cfg.seed)
    state = run_state(run_dir)
    if state == "finished":
        changes = config_changes(run_dir, cfg_dict)
        if changes:
            raise RunError(
                f"{run_dir} holds a finished run with another config (" + "; ".join(changes) + "); "
                "delete it or choose another --out"
            )
        log.info("compare: reusing finished run %s", run_dir)
        return run_dir
    if state == "unfinished":
        log.info("compare: resuming %s", run_dir)
    else:
        log.info("compare: running %s (seed %d) into %s", cfg.method.name, cfg.seed, run_dir)
    run_experiment(cfg, run_dir, resume=state == "unfinished")
    return run_dir


def run_compare(
    config: str,
    methods: list[str],
    seeds: list[int] | None,
    out: str | os.PathLike,
    overrides: list[str] | None = None,
) -> str:
    """Run every method with every seed on ``config`` and write the comparison.

    Args:
        config: a config file or preset name (``demo``).
        methods: registered method names, in table order; ``["all"]``: every registered method (see the module
            docstring).
        seeds: seeds to run (each also sets the class order unless the config fixes ``scenario.seed``); ``None``:
            the config's own seed.
        out: compare directory (see the module docstring).
        overrides: ``--set KEY=VALUE`` overrides applied to every run (before ``method.name`` and ``seed``).

    Returns:
        The markdown table (also in ``compare.md``).

    Raises:
        ValueError: no methods, a method named twice, or an unknown method (checked before anything runs).
        ConfigError: a config of one (method, seed) is invalid (checked before anything runs), or a run found bad
            input while it was built (raised at once; runs finished before it stay).
        FileNotFoundError: data files are missing (raised at once, as above).
        RunError: another process holds the compare directory, or some runs failed; the others' results and the
            table of the methods whose runs all finished are written first, and the message names each failure.
    """
    from .methods import METHODS, load_run_config
    from .rundir import run_dir_lock

    if not methods:
        raise ValueError("compare needs at least one method")
    every = methods == ["all"]
    if every:
        methods = sorted(METHODS)
    elif "all" in methods:
        raise ValueError("--methods all stands alone (every registered method); name methods or give all")
    dupes = sorted({m for m in methods if methods.count(m) > 1})
    if dupes:
        raise ValueError(f"methods named more than once: {', '.join(dupes)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known methods: {', '.join(sorted(METHODS))}")
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds named more than once: {seeds}")
    overrides = list(overrides or [])
    out_path = Path(out)
    # Every config first: a bad key or value is reported once, before anything runs.
    configs: dict[tuple[str, int | None], tuple[RunConfig, dict[str, Any]]] = {}
    for method in methods:
        for seed in seeds if seeds is not None else [None]:
            extra = [f"method.name={method}"] + ([f"seed={seed}"] if seed is not None else [])
            try:
                configs[method, seed] = load_run_config(config, overrides + extra)
            except ConfigError as e:  # name the compare argument, not the override it becomes
                if e.source == f"--set method.name={method}":
                    raise e.with_source(f"--methods {method}") from None
                if e.source == f"--set seed={seed}":
                    raise e.with_source(f"--seeds {seed}") from None
                raise
    is_main = int(os.environ.get("RANK", "0")) == 0
    with run_dir_lock(out_path) if is_main else contextlib.nullcontext():
        return _compare(configs, methods, seeds, out_path, skip_unsupported=every)


def _compare(
    configs: dict[tuple[str, int | None], tuple[RunConfig, dict[str, Any]]],
    methods: list[str],
    seeds: list[int] | None,
    out_path: Path,
    skip_unsupported: bool = False,
) -> str:
    """The runs of :func:`run_compare` (configs loaded, compare directory locked), then the table."""
    from . import report
    from .methods import UnsupportedBackbone
    from .rundir import RunError

    runs: dict[str, list[Path]] = {}
    failures: list[str] = []
    skipped: list[str] = []
    for method in methods:
        dirs: list[Path] = []
        for seed in seeds if seeds is not None else [None]:
            try:
                dirs.append(_one_run(*configs[method, seed], out_path))
            except KeyboardInterrupt:
                raise
            except (ConfigError, FileNotFoundError):
                raise  # bad input (a key-path error found while building, missing data): the same for every run
            except UnsupportedBackbone as e:  # the same for every seed: said once, the other seeds not tried
                if skip_unsupported:
                    log.warning("compare: skipping %s: %s", method, e)
                    skipped.append(f"{method}: {e}")
                else:
                    log.error("compare: %s cannot run on this backbone: %s", method, e)
                    failures.append(f"{method} (every seed): {type(e).__name__}: {e}")
                break
            except Exception as e:
                label = f"{method} (seed {seed if seed is not None else 'from config'})"
                log.error("compare: %s failed: %s: %s", label, type(e).__name__, e)
                failures.append(f"{label}: {type(e).__name__}: {e}")
        if dirs and len(dirs) == (len(seeds) if seeds is not None else 1):
            runs[method] = dirs
    table = ""
    is_main = int(os.environ.get("RANK", "0")) == 0
    if runs and is_main:
        table = report.write_compare({m: [str(d) for d in ds] for m, ds in runs.items()}, out_path, skipped)
        log.info("compare: wrote %s and %s", out_path / "compare.md", out_path / "compare.csv")
    if failures:
        written = f"; the table of the other methods is in {out_path / 'compare.md'}" if runs else ""
        raise RunError(f"{len(failures)} compare run(s) failed{written}:\n  " + "\n  ".join(failures))
    return table
