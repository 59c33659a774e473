"""A system backup killed (SIGKILL) at every step of replacing the image.

A process writes a new image and is killed at one checkpoint of the replace (rescue's
``_pause_point``, which sleeps there when settings.JOB_PAUSE names it). Afterwards exactly one
whole image is current, the old one before the switch and the new one from it, never none; it
verifies and restores; and the next write sweeps what the kill left.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings

from appliance.system import rescue
from appliance.system.paths import layout
from tests.appliance.test_rescue import _assert_one_clean_image, _image_dirs, as_earlier_version
from tests.support.trees import tree_snapshot

pytestmark = pytest.mark.slow

# Runs system_backup_create on the root, pausing at one checkpoint; prints every checkpoint it
# reaches (before the pause), so the test kills it there and nowhere else.
CREATE = """
import sys
from pathlib import Path

from django.conf import settings

root, checkpoint, milliseconds = sys.argv[1:]
settings.configure(JOB_PAUSE=f"system_backup:{checkpoint}:{milliseconds}")

from appliance.system import rescue

pause = rescue._pause_point


def announced(name):
    print(name, flush=True)
    pause(name)


rescue._pause_point = announced
rescue.system_backup_create(Path(root))
print("finished", flush=True)
"""

# Every checkpoint of a replace, in order, and whose image is current when a kill lands there.
REPLACE = [
    ("tar-started", "old"),  # the new tar half written, in its own directory
    ("image-written", "old"),  # tar and manifest whole and synced, not yet current
    ("switched", "new"),  # current renamed to the new directory, the old not yet deleted
]
# First the image of an earlier version is moved into a directory of its own.
ADOPT = [
    ("old-layout-linked", "old"),  # hard links to it in a new directory
    ("old-layout-pointer", "old"),  # current leads there; readers still read the old names
    ("linked-system-backup.json", "old"),  # readers come in through current: the same image
    ("linked-system-backup.tar", "old"),
]


def _writer(root: Path, checkpoint: str, milliseconds: int = 60_000) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CREATE, str(root), checkpoint, str(milliseconds)],
        cwd=settings.BASE_DIR,
        stdout=subprocess.PIPE,
        text=True,
    )


def _wait_until(writer: subprocess.Popen[str], checkpoint: str) -> list[str]:
    """The checkpoints the writer passed, up to ``checkpoint`` where it now waits."""
    assert writer.stdout is not None
    seen = []
    for line in writer.stdout:
        seen.append(line.strip())
        if seen[-1] == checkpoint:
            return seen
    pytest.fail(f"the writer ended without reaching {checkpoint}: it passed {seen}")


def _killed_at(root: Path, checkpoint: str) -> list[str]:
    writer = _writer(root, checkpoint)
    try:
        seen = _wait_until(writer, checkpoint)
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == -9
    return seen


@pytest.mark.parametrize(
    ("earlier", "checkpoint", "current"),
    [(False, checkpoint, current) for checkpoint, current in REPLACE]
    + [(True, checkpoint, current) for checkpoint, current in ADOPT + REPLACE],
)
def test_a_backup_killed_at_any_step_leaves_exactly_one_whole_image(
    demo_appliance: Path, earlier: bool, checkpoint: str, current: str
) -> None:
    the_layout = layout()
    old = rescue.system_backup_info()
    assert old is not None
    etc_old = tree_snapshot(the_layout.etc_dir)
    if earlier:
        as_earlier_version(demo_appliance)
    (the_layout.etc_dir / "added-after-the-first-backup").write_text("new\n")
    etc_new = tree_snapshot(the_layout.etc_dir)

    seen = _killed_at(demo_appliance, checkpoint)
    assert ("old-layout-linked" in seen) is earlier

    info = rescue.system_backup_info()
    assert info is not None, f"no image after a kill at {checkpoint}"
    if current == "old":
        assert info == old
    else:
        assert info.sha256 != old.sha256 and info.created_at >= old.created_at
    assert rescue.system_backup_verify()
    assert rescue.system_backup_check() == info
    # The well-known tar name leads to the same image as the manifest's.
    assert hashlib.sha256(the_layout.system_backup_tar.read_bytes()).hexdigest() == info.sha256

    (the_layout.hostname_file).write_text("changed.example.com\n")
    assert rescue.system_backup_restore() == info
    assert tree_snapshot(the_layout.etc_dir) == (etc_old if current == "old" else etc_new)

    # What the kill left no reader follows; the sweep takes it and the image stays.
    manifest = Path(os.path.realpath(the_layout.system_backup_manifest))
    current_dir = manifest.parent.name if manifest.parent.name.startswith("image-") else None
    left = set(_image_dirs(demo_appliance)) - {current_dir}
    assert set(rescue.system_backup_leftovers_remove()) - {"current"} == left
    assert _image_dirs(demo_appliance) == ([current_dir] if current_dir else [])
    assert rescue.system_backup_info() == info and rescue.system_backup_verify()
    new = rescue.system_backup_create()
    assert rescue.system_backup_info() == new and rescue.system_backup_verify()
    _assert_one_clean_image(demo_appliance)


def test_the_sweep_waits_for_a_writer_and_never_touches_its_image(demo_appliance: Path) -> None:
    """A sweep asked for while an image is half written waits for the writer's lock; the image
    it was writing becomes current, whole."""
    old_dirs = _image_dirs(demo_appliance)
    writer = _writer(demo_appliance, "tar-started", milliseconds=1500)
    try:
        _wait_until(writer, "tar-started")
        [writing] = set(_image_dirs(demo_appliance)) - set(old_dirs)
        started = time.monotonic()
        removed = rescue.system_backup_leftovers_remove()
        waited = time.monotonic() - started
        output, _ = writer.communicate(timeout=60)
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == 0 and output.strip().endswith("finished")
    assert waited > 0.5
    assert removed == []
    assert _image_dirs(demo_appliance) == [writing]
    assert rescue.system_backup_verify()
    _assert_one_clean_image(demo_appliance)
