"""`--checksum sha256|blake3|none`: the manifest says which digest, each file's digest is that of its bytes, verify
re-checks it (a flipped byte fails), the rank files are the same bytes whatever the choice, and contradicting options
are refused before anything is written."""

from __future__ import annotations

import hashlib
import json

import blake3
import pytest

from ckpt_lib.errors import ConversionError
from ckpt_lib.io import manifest
from util import convert_inprocess, make_hf_model, read_mcore_dir

DIGESTS = {"sha256": lambda data: hashlib.sha256(data).hexdigest(), "blake3": lambda data: blake3.blake3(data).hexdigest()}
FLAGS = ("--target-tensor-parallel-size", "2", "--saver-transformer-impl", "local")


def files_of(out):
    doc = json.loads((out / manifest.NAME).read_text())
    return doc, {rel: (out / rel).read_bytes() for rel in doc["files"]}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checksum") / "hf"
    make_hf_model("qwen2", directory)
    return directory


@pytest.mark.parametrize("choice", ["default", "sha256", "blake3", "none"])
def test_manifest_records_the_chosen_digest_of_every_rank_file(hf, tmp_path, choice):
    extra = () if choice == "default" else ("--checksum", choice)
    convert_inprocess("hf", "core_ext", hf, tmp_path / "mc", *FLAGS, *extra)
    algorithm = "blake3" if choice == "default" else choice  # blake3 is a dependency: the rank files' default
    doc, files = files_of(tmp_path / "mc")
    assert doc["checksum"] == algorithm
    for rel, data in files.items():
        info = doc["files"][rel]
        assert info["bytes"] == len(data)
        if algorithm == "none":
            assert set(info) == {"bytes"}
        else:
            assert info[algorithm] == DIGESTS[algorithm](data), rel
    assert manifest.check(tmp_path / "mc") == []
    if algorithm != "none":
        rank_file = next(rel for rel in files if rel.endswith(".pt"))
        data = bytearray(files[rank_file])
        data[-100] ^= 1
        (tmp_path / "mc" / rank_file).write_bytes(bytes(data))
        assert manifest.check(tmp_path / "mc") == [f"{rank_file}: checksum differs from the manifest ({algorithm})"]


def test_rank_files_do_not_depend_on_the_digest(hf, tmp_path):
    convert_inprocess("hf", "core_ext", hf, tmp_path / "sha", *FLAGS, "--checksum", "sha256")
    convert_inprocess("hf", "core_ext", hf, tmp_path / "none", *FLAGS, "--no-checksums")
    for rel in json.loads((tmp_path / "sha" / manifest.NAME).read_text())["files"]:
        assert (tmp_path / "sha" / rel).read_bytes() == (tmp_path / "none" / rel).read_bytes(), rel
    assert read_mcore_dir(tmp_path / "sha").keys() == read_mcore_dir(tmp_path / "none").keys()


def test_hf_shards_default_to_sha256_and_take_blake3(hf, tmp_path):
    convert_inprocess("hf", "core_ext", hf, tmp_path / "mc", *FLAGS)
    for choice in ("sha256", "blake3"):
        out = tmp_path / choice
        extra = () if choice == "sha256" else ("--checksum", "blake3")
        convert_inprocess("core_ext", "hf", tmp_path / "mc", out, "--hf-config-dir", str(hf), *extra)
        doc, files = files_of(out)
        assert doc["checksum"] == choice
        shard = next(rel for rel in files if rel.endswith(".safetensors"))
        assert doc["files"][shard][choice] == DIGESTS[choice](files[shard])
        assert manifest.check(out) == []


def test_manifest_without_a_checksum_field_is_sha256(hf, tmp_path):
    """Manifests written before --checksum existed: per-file "sha256", no "checksum" field."""
    convert_inprocess("hf", "core_ext", hf, tmp_path / "mc", *FLAGS, "--checksum", "sha256")
    path = tmp_path / "mc" / manifest.NAME
    doc = json.loads(path.read_text())
    del doc["checksum"]
    path.write_text(json.dumps(doc))
    assert manifest.check(tmp_path / "mc") == []
    rank_file = next(rel for rel in doc["files"] if rel.endswith(".pt"))
    (tmp_path / "mc" / rank_file).write_bytes((tmp_path / "mc" / rank_file).read_bytes()[:-1] + b"?")
    assert manifest.check(tmp_path / "mc") == [f"{rank_file}: checksum differs from the manifest (sha256)"]


def test_contradicting_options_are_refused_before_writing(hf, tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert_inprocess("hf", "core_ext", hf, tmp_path / "mc", *FLAGS, "--checksum", "sha256", "--no-checksums")
    assert "--no-checksums contradicts --checksum sha256" in capsys.readouterr().err
    assert not (tmp_path / "mc").exists()
    with pytest.raises(ConversionError, match="choose from sha256, blake3, none"):
        manifest.Manifest("md5")
