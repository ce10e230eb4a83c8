"""file_sha256 remembers digests by stat signature: a re-plan lists files instead of reading
them, and no change to a file's bytes may ever be answered with the old digest."""

import hashlib
import os
import sqlite3

import pytest
from prefcurate.schemas import ids


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFCURATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PREFCURATE_DIGEST_CACHE", raising=False)
    return tmp_path / "cache" / "file_digests.sqlite"


def _settled(monkeypatch):
    # files a test has just written are seconds old; the rule under test is the signature's
    monkeypatch.setattr(ids, "_SETTLED_NS", -1)


def _no_reading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the file was read again")

    monkeypatch.setattr(ids, "open", refuse, raising=False)


def test_a_settled_file_is_hashed_once_and_then_answered_from_its_stat(tmp_path, cache, monkeypatch):
    _settled(monkeypatch)
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n' * 1000)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert ids.file_sha256(path) == want
    _no_reading(monkeypatch)
    assert ids.file_sha256(path) == want
    assert ids.file_sha256(str(path)) == want  # (the same file named as a string)


def test_new_bytes_of_the_same_size_and_mtime_are_hashed_again(tmp_path, cache, monkeypatch):
    _settled(monkeypatch)
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"first version\n")
    before = path.stat()
    first = ids.file_sha256(path)
    path.write_bytes(b"other version\n")  # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime put back, as rsync -t or cp -p do
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    assert ids.file_sha256(path) == hashlib.sha256(b"other version\n").hexdigest() != first


def test_a_file_replaced_by_another_is_hashed_again(tmp_path, cache, monkeypatch):
    _settled(monkeypatch)
    path, other = tmp_path / "prompts.jsonl", tmp_path / "next.jsonl"
    path.write_bytes(b"one\n")
    ids.file_sha256(path)
    other.write_bytes(b"two\n")
    other.replace(path)
    assert ids.file_sha256(path) == hashlib.sha256(b"two\n").hexdigest()


def test_a_file_changed_moments_ago_is_not_remembered(tmp_path, cache):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"fresh\n")
    assert ids.file_sha256(path) == hashlib.sha256(b"fresh\n").hexdigest()
    with sqlite3.connect(cache) as connection:
        assert connection.execute("SELECT count(*) FROM file_sha256").fetchone() == (0,)


def test_the_cache_can_be_turned_off_and_a_broken_one_costs_only_time(tmp_path, cache, monkeypatch):
    _settled(monkeypatch)
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"text\n")
    want = hashlib.sha256(b"text\n").hexdigest()
    monkeypatch.setenv("PREFCURATE_DIGEST_CACHE", "0")
    assert ids.file_sha256(path) == want and not cache.exists()
    monkeypatch.delenv("PREFCURATE_DIGEST_CACHE")
    (tmp_path / "not-a-folder").write_text("x")
    monkeypatch.setenv("PREFCURATE_CACHE", str(tmp_path / "not-a-folder"))  # the cache cannot be made
    assert ids.file_sha256(path) == want
