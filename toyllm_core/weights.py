"""Where checkpoints live: `<weights dir>/<name>/`. The default served model is imported by `toyllm pull`
(made, git-ignored); `toyllm-base`, trained here, is committed.

The weights directory does not depend on the working directory: `$TOYLLM_WEIGHTS_DIR` when set
(the image sets it to /app/weights); else `weights/` beside the package in a source checkout (an
editable install); else, for an installed wheel, `$XDG_DATA_HOME/toyllm/weights`
(`~/.local/share/toyllm/weights`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass
class LoadedModel:
    model: object  # ToyLLM, laid out for inference
    tokenizer: object
    name: str  # the checkpoint directory's name, or random-<preset>
    sha256: str  # of the checkpoint's checksums file (its weights file when it has none); "none": random


def load_model(checkpoint: Path | None = None, preset: str | None = None, dtype: str = "bfloat16",
               quant: str = "none", seed: int = 0) -> LoadedModel:
    """The model a command or the server runs: a checkpoint (default: the served model), or random
    weights of `preset` when no checkpoint is given; loaded straight into `dtype`, quantised as
    `quant` says, laid out for the jitted serving steps. A missing checkpoint raises
    `CheckpointError` with what to run."""
    import jax

    from . import checkpoint as ckpt
    from .config import get_dtype, get_preset
    from .serving.model import ToyLLM
    from .serving.quant import apply, check
    from .tokenizer import gpt2_tokenizer, load_tokenizer

    check(quant)  # before anything is loaded
    if preset is not None and checkpoint is None:
        model = ToyLLM(get_preset(preset), jax.random.PRNGKey(seed)).astype(get_dtype(dtype))
        return LoadedModel(apply(model, quant).for_inference(), gpt2_tokenizer(), f"random-{preset}", "none")
    directory = Path(checkpoint or DEFAULT_CHECKPOINT)
    if not directory.is_dir():
        raise ckpt.CheckpointError(missing_checkpoint_hint(directory))
    model, _ = ckpt.load(directory, dtype=get_dtype(dtype))
    sums = directory / ckpt.CHECKSUMS
    digest = hashlib.sha256((sums if sums.exists() else directory / ckpt.WEIGHTS).read_bytes()).hexdigest()
    return LoadedModel(apply(model, quant).for_inference(), load_tokenizer(directory), directory.name, digest)
