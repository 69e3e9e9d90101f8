"""Loading a user's app file, with errors that name the file and line instead of our internals."""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path

from sloserve.app import App, Program


class AppFileError(RuntimeError):
    """The app file cannot be used; the message names the file, the line and what to fix."""


def load_app(path: str | Path) -> App:
    """Import an app file and return the one ``App`` it defines."""
    path = Path(path).resolve()
    if not path.is_file():
        raise AppFileError(f"{path}: no such file; give the path of an app file, e.g. examples/reasoning/app.py")
    spec = importlib.util.spec_from_file_location(f"sloserve_app_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # an app may import modules that sit beside it
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise AppFileError(f"{exc.filename}:{exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - anything the user's module raises is reported at its line
        raise AppFileError(f"{_user_location(exc, path)}: {type(exc).__name__}: {exc}") from None
    finally:
        sys.path.remove(str(path.parent))
    apps = [value for value in vars(module).values() if isinstance(value, App)]
    if not apps:
        raise AppFileError(f"{path}: defines no sloserve App; add `app = App('name')` and an @app.program")
    if len(apps) > 1:
        raise AppFileError(f"{path}: defines {len(apps)} App objects; keep one per file")
    if not apps[0].programs:
        raise AppFileError(f"{path}: App {apps[0].name!r} has no program; decorate an async function with @app.program")
    return apps[0]


def pick_program(app: App, name: str | None, path: str | Path) -> Program:
    if name is None:
        if len(app.programs) > 1:
            names = ", ".join(app.programs)
            raise AppFileError(f"{path}: App {app.name!r} has several programs ({names}); pick one with --program")
        return next(iter(app.programs.values()))
    if name not in app.programs:
        raise AppFileError(f"{path}: App {app.name!r} has no program {name!r}; it has {', '.join(app.programs)}")
    return app.programs[name]


def _user_location(exc: BaseException, path: Path) -> str:
    """The deepest frame of the traceback that lies in the user's file."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if Path(frame.filename) == path]
    return f"{path}:{frames[-1].lineno}" if frames else str(path)
