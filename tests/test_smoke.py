"""The mount comes up, serves files to other processes, and goes away cleanly."""

from conftest import deskfs, run


def test_mount_write_read_unmount(ws):
    run("echo hello > a.txt && mkdir d && mv a.txt d/b.txt", cwd=ws.mnt)
    assert run(["cat", "d/b.txt"], cwd=ws.mnt).stdout == "hello\n"
    assert run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", str(ws.mnt)], cwd="/").stdout.split() == [
        "fuse.deskfs", str(ws.store)]
    ws.unmount()
    assert not (ws.mnt / "d").exists()
    ws.mount()
    assert (ws.mnt / "d" / "b.txt").read_text() == "hello\n"


def test_status_lists_the_workspace(ws):
    (ws.mnt / "f").write_bytes(b"x" * 1000)
    out = deskfs("status", "--json").stdout
    assert f'"mountpoint": "{ws.mnt}"' in out
    assert '"files": 1' in out and '"bytes": 1000' in out


def test_busy_poll_mount_serves_a_burst(make_workspace, tmp_path):
    """With --busy-poll-us the daemon polls /dev/fuse itself between requests; a burst must still be right."""
    ws = make_workspace("poll", True, "--busy-poll-us", "200")
    source = tmp_path / "src"
    source.mkdir()
    for i in range(300):
        (source / f"f{i}").write_bytes(bytes([i % 256]) * (i * 37))
    run(["cp", "-a", str(source), str(ws.mnt / "copy")], cwd="/")
    assert run(["diff", "-r", str(source), str(ws.mnt / "copy")], cwd="/").returncode == 0
    ws.unmount()
    assert not ws.mounted
