import hashlib

from ripper_dist.hashing import options_key, sha256_file


def test_options_key_ignores_order_and_sees_values():
    assert options_key({"a": 1, "b": [1, 2]}) == options_key({"b": [1, 2], "a": 1})
    assert options_key({"a": 1}) != options_key({"a": 2})
    assert options_key({"a": None}) != options_key({})


def test_sha256_file_streams_large_files(tmp_path):
    data = bytes(range(256)) * 20000  # several read blocks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", block=4096) == hashlib.sha256(data).hexdigest()
