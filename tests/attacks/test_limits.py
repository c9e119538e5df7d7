"""Resource limits from the site configuration hold inside a real sandboxed kernel."""

import signal

from tests.server.harness import UserServer, make_site


def test_rlimits_are_the_sites_and_cannot_be_raised(alice_kernel):
    out = alice_kernel.attempt("__import__('resource').getrlimit(__import__('resource').RLIMIT_DATA)")
    mb = 1024 * 1024 * 1024
    assert out["ok"] and out["value"] == f"({mb}, {mb})", out
    out = alice_kernel.attempt(
        "__import__('resource').setrlimit(__import__('resource').RLIMIT_NOFILE, (100000, 100000))"
    )
    assert out["type"] == "ValueError" or out["errno"] == "EPERM", out


def test_memory_beyond_the_limit_fails_and_the_kernel_survives(alice_kernel):
    out = alice_kernel.attempt("len(bytearray(1500 * 1024 * 1024))")
    assert out["type"] == "MemoryError", out
    out = alice_kernel.attempt("len(bytearray(10 * 1024 * 1024))")
    assert out["ok"] and out["value"] == str(10 * 1024 * 1024), out


def test_open_files_stop_at_the_limit(alice_kernel):
    res = alice_kernel.run(
        "_fds = []\n"
        "try:\n"
        "    while True: _fds.append(os.open('/dev/null', os.O_RDONLY))\n"
        "except OSError as e: print('@@', errno.errorcode[e.errno], len(_fds))\n"
        "for _fd in _fds: os.close(_fd)\n"
    )
    code, count = res.stdout.split("@@")[1].splitlines()[0].split()  # the marker line; other output may follow
    # The kernel holds some descriptors already (ZMQ sockets, files): fewer than 256 are left.
    assert code == "EMFILE" and 100 < int(count) < 256, res.stdout


def test_process_count_stops_at_the_limit(alice_kernel):
    res = alice_kernel.run(
        "_ps = []\n"
        "try:\n"
        "    for _ in range(200): _ps.append(subprocess.Popen(['sleep', '30']))\n"
        "except OSError as e: print('@@', errno.errorcode[e.errno], len(_ps))\n"
        "for _p in _ps: _p.kill(); _p.wait()\n"
    )
    code, count = res.stdout.split("@@")[1].splitlines()[0].split()  # the marker line; other output may follow
    assert code == "EAGAIN" and int(count) < 64, res.stdout


def test_cpu_time_limit_kills_a_runaway_process(world, make_system_user):
    site = make_site(world.root / "cpu", {"onc": ["bc"]}, sandbox={"cpu_seconds": 2})
    user = make_system_user("cpu")
    with UserServer(site, user, ("onc",), world.root) as server:
        res = server.run(
            "import subprocess, resource\n"
            "print(resource.getrlimit(resource.RLIMIT_CPU))\n"
            "print(subprocess.run(['/usr/bin/python3', '-c', 'while True: pass']).returncode)\n",
            timeout=60,
        )
    # Soft and hard limit are equal: at 2 s of CPU the kernel of the host sends SIGKILL.
    assert res.stdout.split() == ["(2,", "2)", str(-signal.SIGKILL)], res
