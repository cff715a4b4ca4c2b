"""The CLI's last line of defence: whatever escapes a command is one `streamsynth <command>: error:` line (a
traceback only with -v), Ctrl-C is exit status 130, and an OS error names its file."""

from __future__ import annotations

import re

import pytest

from streamsynth.cli import main as cli


@pytest.fixture
def failing_stats(monkeypatch):
    """Make `streamsynth captions stats` raise `exc` (the parser is built per call, so it picks this up)."""
    def install(exc: BaseException):
        def stats(args):
            raise exc
        monkeypatch.setattr("streamsynth.commands.captions._stats", stats)
    return install


def _run(argv, capsys) -> tuple[int, str]:
    code = cli(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("exc, code, words", [
    (KeyError("missing"), 1, ["unexpected KeyError", "-v"]),
    (KeyboardInterrupt(), 130, ["interrupted"]),
    (PermissionError(13, "Permission denied", "/data/x.lmdb"), 2, ["/data/x.lmdb: Permission denied"]),
    (RuntimeError("Caught CaptionStoreError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                  "last):\n  File \"x.py\", line 1\nstreamsynth.captions.store.CaptionStoreError: store s is damaged"),
     2, ["error: store s is damaged"]),
])
def test_anything_that_escapes_is_one_line(failing_stats, capsys, tmp_path, exc, code, words):
    failing_stats(exc)
    got, err = _run(["captions", "stats", str(tmp_path)], capsys)
    assert got == code and "Traceback" not in err and err.count("\n") == 1, err
    assert all(word in err for word in words), err


def test_verbose_shows_the_traceback(failing_stats, tmp_path):
    failing_stats(KeyError("missing"))
    with pytest.raises(KeyError):
        cli(["-v", "captions", "stats", str(tmp_path)])


@pytest.mark.parametrize("argv, flag", [
    (["evaluate", "m.pt", "--imagenet-val", "v", "--image-size", "-5"], "--image-size"),  # scored 30 images as unreadable
    (["evaluate", "m.pt", "--imagenet-val", "v", "--batch-size", "0"], "--batch-size"),
    (["evaluate", "m.pt", "--imagenet-val", "v", "--workers", "-1"], "--workers"),
    (["evaluate", "m.pt", "--imagenet-val", "v", "--device", "gpu0"], "--device"),
    (["audit-privacy", "m.pt", "--members", "a", "--non-members", "b", "--image-size", "0"], "--image-size"),
    (["caption", "--images", "i", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["caption", "--images", "i", "--out", "o", "--workers", "two"], "--workers"),
    (["caption", "--images", "i", "--out", "o", "--commit-every", "0"], "--commit-every"),
    (["caption", "--images", "i", "--out", "o", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["caption", "--images", "i", "--out", "o", "--devices", "cuda:0,cuda:x"], "--devices"),
    (["captions", "stats", "s", "--examples", "-1"], "--examples"),
    (["caption-bench", "--num-images", "0"], "--num-images"),
    (["caption-bench", "--batch-size", "8,0"], "--batch-size"),
    (["caption-bench", "--baseline-batch-size", "nan"], "--baseline-batch-size"),
])
def test_a_bad_number_is_refused_when_the_command_is_parsed(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert re.search(rf"error: argument (-\w/)?{flag}:", err.splitlines()[-1]), err
