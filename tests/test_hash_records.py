"""A large input is hashed once: its hash is recorded under the cache directory and trusted
while the file's size, mtime_ns and inode are unchanged; `cfiw --rehash` ignores the records."""

import os
import shutil

import pytest

from cfiw_cli import artifacts


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """A fresh record directory, and a count of the files actually read and hashed."""
    monkeypatch.setenv("CFIW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CFIW_REHASH", "0")
    hashed = []
    real = artifacts._hash_file

    def counting(path, *args, **kwargs):
        hashed.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(artifacts, "_hash_file", counting)
    artifacts._cached_hash.cache_clear()  # each call below is as a new process would see it
    yield hashed
    artifacts._cached_hash.cache_clear()


def big_file(path, byte=b"a"):
    path.write_bytes(byte * (artifacts.RECORD_MIN_BYTES + 10))
    return path


def fresh_sha256(path):
    artifacts._cached_hash.cache_clear()
    return artifacts.sha256_of(path)


def test_a_large_file_is_hashed_once_and_its_record_trusted(counted, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    weights = big_file(model / "model.safetensors")
    (model / "config.json").write_text("{}")
    first = fresh_sha256(model)
    assert sorted(counted) == ["config.json", "model.safetensors"]
    assert fresh_sha256(model) == first
    assert sorted(counted) == ["config.json", "config.json", "model.safetensors"]  # small files: hashed again
    records = list(artifacts.hash_records().glob("*.json"))
    assert len(records) == 1 and str(weights.resolve()) in records[0].read_text()
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]  # nothing added


def test_a_changed_file_is_hashed_again(counted, tmp_path):
    weights = big_file(tmp_path / "model.safetensors")
    first = fresh_sha256(weights)
    stat = weights.stat()
    with open(weights, "r+b") as handle:  # same size, same inode: only the mtime tells
        handle.write(b"b")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = fresh_sha256(weights)
    assert second != first and counted == ["model.safetensors"] * 2
    shutil.copy2(weights, tmp_path / "copy")  # the same bytes, size and mtime put in place: a new inode
    os.replace(tmp_path / "copy", weights)
    assert fresh_sha256(weights) == second and len(counted) == 3


def test_rehash_ignores_the_records_and_a_bad_record_is_hashed_around(counted, tmp_path, monkeypatch):
    weights = big_file(tmp_path / "model.safetensors")
    first = fresh_sha256(weights)
    monkeypatch.setenv("CFIW_REHASH", "1")
    assert fresh_sha256(weights) == first and len(counted) == 2
    monkeypatch.setenv("CFIW_REHASH", "0")
    (record,) = artifacts.hash_records().glob("*.json")
    record.write_text("{not json")
    assert fresh_sha256(weights) == first and len(counted) == 3
    assert fresh_sha256(weights) == first and len(counted) == 3  # the record was written again
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CFIW_CACHE_DIR", str(tmp_path / "a-file" / "cache"))  # no record can be written
    assert fresh_sha256(weights) == first and len(counted) == 4
    assert fresh_sha256(weights) == first and len(counted) == 5  # hashed each time, never an error


def test_the_rehash_flag_reaches_every_hash(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("CFIW_REHASH", "0")  # restored after the test
    assert not artifacts.rehash_requested()
    done = cli("--rehash", "validate", tmp_path / "missing.parquet")
    assert done.exit_code == 1 and artifacts.rehash_requested()
    assert "--rehash" in cli("--help").stdout
