"""Ultralytics, fully offline: ``prepare_ultralytics()`` before anything imports ``ultralytics``.

Nothing happens at import: the code paths that need Ultralytics (building or loading a YOLO model, the
spiking YOLO, training, the ``casc`` command) call ``prepare_ultralytics()`` first, or reach the Ultralytics
classes through ``ultralytics_api()``, which calls it. It does, once, without overriding anything a user
set themselves:

* ``YOLO_OFFLINE=1`` (no hub, no DNS probe, no event sync, no AutoUpdate attempts) unless set;
* ``YOLO_AUTOINSTALL=false`` (``check_requirements`` never runs pip) unless set;
* ``YOLO_CONFIG_DIR``: a directory this project controls (``$CASC_CACHE_DIR/ultralytics``, default
  ``~/.cache/casc-detector/ultralytics``, a temp dir if that is not writable) unless set; its settings get
  ``sync=False``;
* ``Arial.ttf`` / ``Arial.Unicode.ttf`` in ``$YOLO_CONFIG_DIR/Ultralytics/``: a copy of matplotlib's DejaVuSans,
  added only when missing, so Ultralytics' plotting never downloads a font;
* then imports ``ultralytics`` (without its first-use settings banner) and turns its online checks and
  auto-install off (also when a user imported Ultralytics before us).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

_prepared = False


def _config_root() -> Path:
    base = os.environ.get("CASC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "casc-detector")
    root = Path(base) / "ultralytics"
    try:
        (root / "Ultralytics").mkdir(parents=True, exist_ok=True)
        if os.access(root / "Ultralytics", os.W_OK):
            return root
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="casc-ultralytics-"))


def _install_fonts(config_dir: Path) -> None:
    target_dir = config_dir / "Ultralytics"
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        import matplotlib

        source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            if not (target_dir / name).exists() and source.exists():
                shutil.copyfile(source, target_dir / name)
    except (OSError, ImportError):  # plotting may then try a download, which fails offline: no crash
        pass


def _set_environment() -> bool:
    """The environment (only where unset) and fonts, before ``import ultralytics``; True if the config
    directory is ours."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    owned = False
    if "ultralytics" not in sys.modules and not os.environ.get("YOLO_CONFIG_DIR"):
        os.environ["YOLO_CONFIG_DIR"] = str(_config_root())
        owned = True
    if os.environ.get("YOLO_CONFIG_DIR"):
        _install_fonts(Path(os.environ["YOLO_CONFIG_DIR"]))
    return owned


def _after_import(user_autoinstall: bool, owned_config: bool) -> None:
    """Belt and braces once Ultralytics is imported (also when the user imported it before us)."""
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR, checks

    if not user_autoinstall:
        checks.AUTOINSTALL = False  # never pip-install from inside a run
    if os.environ.get("YOLO_OFFLINE", "").lower() in {"1", "true", "yes", "on", "y", "t"}:
        import ultralytics.utils as uutils

        uutils.ONLINE = False
        checks.ONLINE = False
    _install_fonts(Path(USER_CONFIG_DIR).parent)
    if owned_config and SETTINGS.get("sync", False):
        try:
            SETTINGS.update({"sync": False})
        except Exception:  # settings file not writable: events stay off anyway while offline
            pass


class _SettingsBanner(logging.Filter):
    """Drops the "Creating new Ultralytics Settings ... 'yolo settings'" notice that a first import prints: the
    settings file lives in this project's cache and is not the user's to edit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Creating new Ultralytics Settings")


def prepare_ultralytics() -> None:
    """Make Ultralytics run offline (see the module docstring) and import it. Call it before anything
    imports ``ultralytics``; later calls do nothing."""
    global _prepared
    if _prepared:
        return
    user_autoinstall = "YOLO_AUTOINSTALL" in os.environ
    owned_config = _set_environment()
    banner = _SettingsBanner()
    logging.getLogger("ultralytics").addFilter(banner)
    try:
        import ultralytics  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name != "ultralytics":
            raise
        raise ModuleNotFoundError("YOLO models need Ultralytics, installed without its GUI OpenCV: "
                                  "pip install --no-deps 'ultralytics==8.4.190' (docs/quickstart.md)",
                                  name="ultralytics") from None
    finally:
        logging.getLogger("ultralytics").removeFilter(banner)
    _after_import(user_autoinstall, owned_config)
    _prepared = True


def ultralytics_api() -> ModuleType:
    """``detector.models.yolo.ultralytics_api``, the Ultralytics classes this adapter uses, imported after
    ``prepare_ultralytics()``."""
    prepare_ultralytics()
    from . import ultralytics_api as api

    return api
