"""API keys: shown once, stored hashed, listed without the key, revoked by name; and their CLI."""

from __future__ import annotations

import hashlib
import json
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanostream.cli import main as cli
from nanostream.store import keys


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path))
    return tmp_path


def test_a_key_is_random_prefixed_and_stored_only_as_its_sha256(home):
    record, key = keys.create_key("ci")
    other = keys.create_key("laptop")[1]
    assert key.startswith(keys.PREFIX) and len(key) >= 40 and key != other
    text = keys.keys_path().read_text()
    assert key not in text and other not in text
    assert record.digest == hashlib.sha256(key.encode()).hexdigest() and record.digest in text
    assert stat.S_IMODE(keys.keys_path().stat().st_mode) == 0o600


def test_find_key_recognises_only_the_real_key(home):
    record, key = keys.create_key("ci")
    assert keys.find_key(key) == record
    assert keys.find_key(key[:-1]) is None
    assert keys.find_key(key + "x") is None
    assert keys.find_key("") is None
    assert keys.find_key(record.digest) is None  # the stored digest is not a key


def test_revoked_keys_are_found_marked_and_stay_listed(home):
    _, key = keys.create_key("ci")
    revoked = keys.revoke_key("ci")
    assert revoked.revoked and revoked.revoked_at
    assert keys.find_key(key).revoked
    assert keys.revoke_key("ci") == revoked  # twice changes nothing
    assert [k.public() for k in keys.list_keys()] == [revoked.public()]
    with pytest.raises(keys.KeysError, match="already exists"):
        keys.create_key("ci")  # a revoked name stays taken, so `revoke NAME` is never ambiguous


def test_names_default_and_are_checked(home):
    assert [keys.create_key()[0].name for _ in range(3)] == ["key-1", "key-2", "key-3"]
    for bad in ("", "   ", "x" * 65, "tab\there"):
        with pytest.raises(keys.KeysError):
            keys.create_key(bad)
    with pytest.raises(keys.KeysError, match="no key named 'nope'"):
        keys.revoke_key("nope")


def test_a_damaged_key_file_is_an_error_not_an_empty_list(home):
    keys.keys_path().write_text("{not json")
    with pytest.raises(keys.KeysError, match="damaged"):
        keys.list_keys()


def test_concurrent_creates_keep_every_key(home):
    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda i: keys.create_key(f"k{i}"), range(16)))
    assert sorted(k.name for k in keys.list_keys()) == sorted(f"k{i}" for i in range(16))
    assert all(keys.find_key(key).name == record.name for record, key in created)


# ---------------------------------------------------------------- CLI

def test_cli_create_prints_the_key_alone_on_the_last_line(home, capsys):
    assert cli.main(["keys", "create", "--name", "ci"]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    assert key.startswith(keys.PREFIX) and " " not in key
    assert keys.find_key(key).name == "ci"
    assert cli.main(["keys", "create", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert keys.find_key(payload["key"]).name == payload["name"] == "key-1"


def test_cli_list_and_revoke(home, capsys):
    _, key = keys.create_key("ci")
    keys.create_key("laptop")
    assert cli.main(["keys", "list"]) == 0
    out = capsys.readouterr().out
    assert "ci" in out and "laptop" in out and key not in out
    assert cli.main(["keys", "revoke", "ci"]) == 0
    assert "revoked key 'ci'" in capsys.readouterr().out
    assert cli.main(["keys", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert {r["name"]: r["revoked"] for r in rows} == {"ci": True, "laptop": False}
    assert all(set(r) == {"name", "created_at", "revoked", "revoked_at"} for r in rows)


def test_cli_errors_are_one_line_and_status_2(home, capsys):
    assert cli.main(["keys", "revoke", "nope"]) == 2
    keys.create_key("ci")
    assert cli.main(["keys", "create", "--name", "ci"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
