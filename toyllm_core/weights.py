"""Where checkpoints live: `weights/<name>/`. The default served model is imported by `toyllm pull`
(made, git-ignored); `toyllm-base`, trained here, is committed."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_CHECKPOINT = WEIGHTS_DIR / DEFAULT_MODEL
BASE_CHECKPOINT = WEIGHTS_DIR / "toyllm-base"


def missing_checkpoint_hint(directory: Path) -> str:
    """What to tell a user whose checkpoint directory is not there."""
    if directory.resolve() == DEFAULT_CHECKPOINT:
        return f"{directory}: not pulled yet; run `toyllm pull {DEFAULT_MODEL}` (or `make serve`, which pulls it)"
    return f"{directory}: no checkpoint there; pass --checkpoint DIR (or --preset seed for random weights)"
