"""Where checkpoints live: `<weights dir>/<name>/`. The default served model is imported by `toyllm pull`
(made, git-ignored); `toyllm-base`, trained here, is committed.

The weights directory does not depend on the working directory: `$TOYLLM_WEIGHTS_DIR` when set
(the image sets it to /app/weights); else `weights/` beside the package in a source checkout (an
editable install); else, for an installed wheel, `$XDG_DATA_HOME/toyllm/weights`
(`~/.local/share/toyllm/weights`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV_VAR = "TOYLLM_WEIGHTS_DIR"
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def weights_dir(environ: Mapping[str, str] = os.environ, source_root: Path = SOURCE_ROOT) -> Path:
    """The weights directory (absolute), from the environment and where the package is."""
    if environ.get(ENV_VAR):
        return Path(environ[ENV_VAR]).expanduser().resolve()
    if (source_root / "pyproject.toml").is_file():  # a source checkout: weights/ sits beside the package
        return source_root / "weights"
    data_home = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser().resolve() / "toyllm" / "weights"


WEIGHTS_DIR = weights_dir()
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_CHECKPOINT = WEIGHTS_DIR / DEFAULT_MODEL
BASE_CHECKPOINT = WEIGHTS_DIR / "toyllm-base"


def missing_checkpoint_hint(directory: Path) -> str:
    """What to tell a user whose checkpoint directory is not there."""
    if Path(directory).resolve() == DEFAULT_CHECKPOINT.resolve():
        return f"{directory}: not pulled yet; run `toyllm pull {DEFAULT_MODEL}` (or `make serve`, which pulls it)"
    return f"{directory}: no checkpoint there; pass --checkpoint DIR (or --preset seed for random weights)"
