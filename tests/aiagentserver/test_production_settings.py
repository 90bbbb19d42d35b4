"""The settings off DEBUG: required hosts, secure cookies and headers, and a clean ``check --deploy``.

Each case runs the settings in a fresh process under the environment it names, as a deployment would.
"""

import json
import secrets
import subprocess
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent.parent

PRODUCTION = {"DEBUG": "0", "ALLOWED_HOSTS": "agents.example.com"}
HTTPS_OPT_INS = {
    "SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto",
    "SECURE_SSL_REDIRECT": "1",
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "1",
    "SECURE_HSTS_PRELOAD": "1",
}
SECURITY_SETTINGS = (
    "DEBUG", "ALLOWED_HOSTS", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "SESSION_COOKIE_HTTPONLY",
    "X_FRAME_OPTIONS", "SECURE_CONTENT_TYPE_NOSNIFF", "SECURE_PROXY_SSL_HEADER", "SECURE_SSL_REDIRECT",
    "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS", "SECURE_HSTS_PRELOAD",
)  # fmt: skip


def run(args: list[str], tmp_path: Path, **environment: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": "/usr/bin:/bin",
        "VAR_DIR": str(tmp_path),
        "SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_SETTINGS_MODULE": "aiagentserver.settings",
        **environment,
    }
    return subprocess.run([sys.executable, *args], cwd=BASE_DIR, env=env, capture_output=True, text=True)


def settings_under(tmp_path: Path, **environment: str) -> dict:
    script = (
        "import json; from django.conf import settings; "
        f"print(json.dumps({{name: getattr(settings, name) for name in {SECURITY_SETTINGS!r}}}))"
    )
    result = run(["-c", script], tmp_path, **environment)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_allowed_hosts_is_required_without_debug(tmp_path):
    for hosts in (None, "", " , "):
        environment = {"DEBUG": "0"} if hosts is None else {"DEBUG": "0", "ALLOWED_HOSTS": hosts}
        result = run(["-c", "import aiagentserver.settings"], tmp_path, **environment)
        assert result.returncode != 0
        assert "ImproperlyConfigured: ALLOWED_HOSTS must be set when DEBUG is off" in result.stderr


def test_debug_keeps_its_local_hosts_and_plain_cookies(tmp_path):
    found = settings_under(tmp_path, DEBUG="1")
    assert found["DEBUG"] is True
    assert found["ALLOWED_HOSTS"] == ["localhost", "127.0.0.1", "[::1]"]
    assert found["SESSION_COOKIE_SECURE"] is False and found["CSRF_COOKIE_SECURE"] is False


def test_production_defaults_are_secure_and_https_extras_are_opt_in(tmp_path):
    found = settings_under(tmp_path, **PRODUCTION)
    assert found["DEBUG"] is False
    assert found["ALLOWED_HOSTS"] == ["agents.example.com"]
    assert found["SESSION_COOKIE_SECURE"] is True and found["CSRF_COOKIE_SECURE"] is True
    assert found["SESSION_COOKIE_HTTPONLY"] is True
    assert found["X_FRAME_OPTIONS"] == "DENY"
    assert found["SECURE_CONTENT_TYPE_NOSNIFF"] is True
    assert found["SECURE_PROXY_SSL_HEADER"] is None
    assert found["SECURE_SSL_REDIRECT"] is False
    assert found["SECURE_HSTS_SECONDS"] == 0

    opted_in = settings_under(tmp_path, **PRODUCTION, **HTTPS_OPT_INS)
    assert opted_in["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert opted_in["SECURE_SSL_REDIRECT"] is True
    assert opted_in["SECURE_HSTS_SECONDS"] == 31536000
    assert opted_in["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is True and opted_in["SECURE_HSTS_PRELOAD"] is True


def test_secure_cookies_can_be_turned_off_for_plain_http(tmp_path):
    found = settings_under(tmp_path, **PRODUCTION, SECURE_COOKIES="0")
    assert found["SESSION_COOKIE_SECURE"] is False and found["CSRF_COOKIE_SECURE"] is False
    assert found["SESSION_COOKIE_HTTPONLY"] is True


def test_a_bad_proxy_header_name_is_refused_with_the_variable(tmp_path):
    result = run(
        ["-c", "import aiagentserver.settings"], tmp_path, **PRODUCTION, SECURE_PROXY_SSL_HEADER="X-Proto: https"
    )
    assert result.returncode != 0
    assert "SECURE_PROXY_SSL_HEADER='X-Proto: https' is not a header name" in result.stderr


def test_check_deploy_leaves_only_the_https_opt_ins_and_nothing_once_they_are_set(tmp_path):
    manage = [str(BASE_DIR / "manage.py"), "check", "--deploy"]
    defaults = run(manage, tmp_path, **PRODUCTION)
    assert defaults.returncode == 0, defaults.stderr
    # HSTS and the redirect to HTTPS depend on how TLS is served in front of the server: left to the operator.
    warnings = sorted(line.split()[1] for line in defaults.stderr.splitlines() if line.startswith("?: ("))
    assert warnings == ["(security.W004)", "(security.W008)"], defaults.stderr

    opted_in = run(manage, tmp_path, **PRODUCTION, **HTTPS_OPT_INS)
    assert opted_in.returncode == 0, opted_in.stderr
    assert "System check identified no issues" in opted_in.stdout, opted_in.stdout + opted_in.stderr


def test_manage_py_says_in_one_line_what_the_settings_lack(tmp_path):
    """Run as the README showed it (no DEBUG=1), a command printed a traceback ending in the missing setting."""
    result = run(["manage.py", "sync_tasks"], tmp_path, DEBUG="0", SECRET_KEY="")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("manage.py: SECRET_KEY must be set when DEBUG is off")
    assert "DEBUG=1" in result.stderr
