"""Leftover cleanup removes exactly the temporary names this package writes, never a user's file."""
from ripper_dist.parts import clean_leftovers, parts_root


def test_clean_leftovers_removes_only_our_temporary_names(tmp_path):
    track = tmp_path / "song"
    ours = [".vocals.wav.0123456789ab.tmp", ".vocals.wav.0123456789ab.f32", ".drums.flac.abcdef012345.tmp",
            ".vocals.band_masks.npy.k2j_9x0a.tmp", ".other.wav.a1b2c3d4.tmp"]
    users = ["vocals.wav", ".notes.tmp", "vocals.wav.0123456789ab.tmp", ".vocals.wav.MINE1234.tmp",
             ".vocals.mp3.0123456789ab.tmp", ".vocals.wav.0123456789ab.tmp.keep"]
    for name in ours + users:
        (track / name).parent.mkdir(exist_ok=True)
        (track / name).write_bytes(b"x")
    part = parts_root(tmp_path, "key") / "song" / "span-00000-of-00002.f32"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x")
    empty = tmp_path / "failed_track"
    empty.mkdir()
    clean_leftovers(tmp_path, "key", [track, empty, tmp_path / "never_made"])
    assert sorted(p.name for p in track.iterdir()) == sorted(users)
    assert not parts_root(tmp_path, "key").exists() and not empty.exists()
