"""``loracache doctor`` run as a worker would run it: a real process, against a real daemon,
from environments where sharing works and where it does not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from loracache.client.doctor import Check, _visibility
from tests.support import CLI_AS_USER, REPO

NOBODY = 65534
def doctor(socket, *, user: str | None = None, private_shm: bool = False):
    if user is not None:
        command = [sys.executable, "-c", CLI_AS_USER, user, "doctor", "--socket", str(socket)]
    else:
        command = [sys.executable, "-m", "loracache.client.cli", "doctor", "--socket",
                   str(socket)]
    if private_shm:  # a container given the socket but not the host's /dev/shm
        command = ["unshare", "--mount", "sh", "-c",
                   'mount -t tmpfs tmpfs /dev/shm && exec "$0" "$@"', *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HOME": "/tmp"})
    return done.returncode, done.stdout


def lines(output: str, prefix: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(prefix)]


def test_all_checks_pass_where_sharing_works(daemon):
    code, output = doctor(daemon.socket)
    assert code == 0, output
    assert [line.split(":")[0] for line in lines(output, "ok")] == [
        "ok    socket", "ok    daemon", "ok    cpu test lease"]
    assert "3 of 3 checks passed" in output
    assert daemon.stats().leases == 0  # the test lease went back
    assert daemon.cpu_stats().entries == 0  # and it never was a cache entry


def test_no_socket_says_how_to_point_at_one(tmp_path):
    code, output = doctor(tmp_path / "nowhere.sock")
    assert code == 1
    assert lines(output, "FAIL")[0].startswith("FAIL  socket:")
    assert "LORACACHE_SOCKET" in output and "0 of 1 checks passed" in output


def test_a_daemon_that_died_is_reported(daemon):
    daemon.stop(signal.SIGKILL)  # its socket file stays behind
    code, output = doctor(daemon.socket)
    assert code == 1
    assert lines(output, "FAIL")[0].startswith("FAIL  daemon:")
    assert "systemctl start loracache" in output


def test_a_user_outside_the_group_is_told_to_join_it(daemon):
    code, output = doctor(daemon.socket, user=f"{NOBODY}:{NOBODY}")
    assert code == 1
    assert lines(output, "FAIL")[0].startswith("FAIL  socket:")
    assert "usermod -aG" in output


def test_a_user_outside_the_group_of_the_sockets_directory_is_told_to_join_it(locked_socket):
    code, output = doctor(locked_socket, user=f"{NOBODY}:{NOBODY}")
    assert code == 1 and "Traceback" not in output, output
    assert lines(output, "FAIL") == [
        f"FAIL  socket: {locked_socket.parent} is not open to user nobody (it belongs to group "
        "root, mode 0750)"]
    assert "usermod -aG root nobody" in output and "supplementalGroups" in output
    code, output = doctor(locked_socket, user=f"{NOBODY}:{os.getgid()}")  # the fix works
    assert code == 0, output


def test_a_user_in_the_group_passes(daemon):
    code, output = doctor(daemon.socket, user=f"{NOBODY}:{os.getgid()}")
    assert code == 0, output


def test_a_worker_without_the_daemons_dev_shm_cannot_map(daemon):
    code, output = doctor(daemon.socket, private_shm=True)
    assert code == 1
    assert [line.split(":")[0] for line in lines(output, "FAIL")] == ["FAIL  cpu test lease"]
    assert "shared-memory file" in output
    assert daemon.stats().leases == 0  # the lease it could not map went back


GPUS = ["cuda:GPU-aaaaaaaa-0000-0000-0000-000000000000",
        "cuda:GPU-bbbbbbbb-0000-0000-0000-000000000000",
        "cuda:MIG-cccccccc-0000-0000-0000-000000000000"]


def test_a_worker_that_claimed_one_gpu_of_several_is_not_failed_for_the_others():
    seen = {GPUS[1].removeprefix("cuda:"): 0}  # a pod given one GPU sees it as cuda:0
    checks, probed = _visibility(["cpu", *GPUS], seen.get)
    assert [(c.name, c.ok, c.skipped) for c in checks] == [
        (GPUS[0], True, True), (GPUS[1], True, False), (GPUS[2], True, True)]
    assert checks[1].detail == "visible here as cuda:0"
    assert probed == ["cpu", GPUS[1]]  # test leases only where this worker would lease


def test_a_worker_that_sees_none_of_the_daemons_gpus_fails_with_the_fix():
    checks, probed = _visibility(GPUS, {}.get)
    assert [(c.ok, c.skipped) for c in checks] == [(False, False)] * 3
    assert all("CUDA_VISIBLE_DEVICES" in c.fix for c in checks)
    assert probed == []
    assert _visibility(["cpu"], {}.get) == ([], ["cpu"])  # a CPU-only daemon: nothing to see


def test_skipped_checks_are_marked_and_left_out_of_the_count(capsys):
    Check("cuda:GPU-a", True, "not visible here", skipped=True).print()
    Check("cuda:GPU-b", True, "visible here as cuda:0").print()
    assert capsys.readouterr().out.splitlines() == [
        "skip  cuda:GPU-a: not visible here", "ok    cuda:GPU-b: visible here as cuda:0"]
