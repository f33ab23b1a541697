"""A rank's error file is never seen half-written by the elastic agent (which parses it as JSON)."""

from __future__ import annotations

import json
import threading

from constrainedsparse import launcher
from constrainedsparse.distributed import ENV_LAUNCHED


def test_error_file_is_whole_at_every_moment(tmp_path, monkeypatch):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv(ENV_LAUNCHED, "1")  # launched: nothing printed
    launcher.report_error("first")
    seen: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(error_file.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for index in range(1500):
            launcher.report_error(f"message {index}", peer=True)
    finally:
        stop.set()
        reader.join()
    assert seen
    for text in seen:  # an in-place write is read empty or cut here now and then
        assert json.loads(text)["constrainedsparse"]["rank"] == 0
    assert json.loads(error_file.read_text())["message"]["message"] == "message 1499"
    assert [path.name for path in tmp_path.iterdir()] == ["error.json"]  # no temporary left behind
