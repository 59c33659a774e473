"""docker-compose.yml cannot run here (no Docker engine), so it is kept right by this test."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import yaml

BASE_DIR = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((BASE_DIR / "docker-compose.yml").read_text())


def _command_words(service: dict) -> list[str]:
    command = service["command"]
    if isinstance(command, str):
        return shlex.split(command)
    if command[:2] == ["sh", "-c"]:
        return shlex.split(command[2])
    return list(command)


def _management_command_exists(name: str) -> bool:
    return any(BASE_DIR.glob(f"*/management/commands/{name}.py"))


def test_it_has_web_worker_beat_smtp_redis_and_postgres_with_health_checks():
    services = _compose()["services"]

    assert set(services) == {"web", "worker", "beat", "smtp", "redis", "postgres"}
    for name in ("web", "worker", "smtp", "redis", "postgres"):
        assert "healthcheck" in services[name], name


def test_each_console_service_runs_a_command_that_exists_in_the_project():
    services = _compose()["services"]
    for name in ("web", "worker", "beat", "smtp"):
        words = _command_words(services[name])
        if "manage.py" in words:
            command = words[words.index("manage.py") + 1]
            assert (BASE_DIR / "manage.py").is_file(), name
            assert _management_command_exists(command), f"{name}: no command {command!r}"
        if "gunicorn" in words:
            module, _, attribute = words[words.index("gunicorn") + 1].partition(":")
            source = (BASE_DIR / module.replace(".", "/")).with_suffix(".py").read_text()
            assert f"{attribute} =" in source, name
        if "celery" in words:
            app = words[words.index("-A") + 1]
            assert (BASE_DIR / app / "celery.py").is_file(), name
        if "lmi.launcher" in words:
            assert (BASE_DIR / "lmi" / "launcher.py").is_file()
            assert words[words.index("lmi.launcher") + 1] == "setup"


def test_the_console_services_are_configured_through_lmi_variables_and_volumes():
    compose = _compose()
    web = compose["services"]["web"]
    environment = web["environment"]

    assert environment["LMI_DATABASE_URL"].startswith("postgres://")
    assert environment["LMI_REDIS_URL"] == "redis://:${REDIS_PASSWORD:-change-me}@redis:6379/0"
    assert {"appliance", "var", "backups", "postgres", "redis"} <= set(compose["volumes"])
    assert (BASE_DIR / web["env_file"].replace(".env", ".env.example")).is_file()
    assert (BASE_DIR / "Dockerfile").is_file()


def test_the_example_environment_names_only_variables_the_console_reads():
    sources = "".join(
        path.read_text()
        for folder in ("lmi", "accounts")
        for path in (BASE_DIR / folder).rglob("*.py")
    )
    for line in (BASE_DIR / ".env.example").read_text().splitlines():
        if line.startswith("LMI_"):
            name = line.split("=", 1)[0]
            assert f'"{name.removeprefix("LMI_")}"' in sources or f'"{name}"' in sources, name


def test_the_smtp_service_listens_on_all_interfaces_on_the_mapped_port():
    smtp = _compose()["services"]["smtp"]
    words = _command_words(smtp)

    assert words[:3] == ["python", "manage.py", "smtp_service"]
    assert words[words.index("--host") + 1] == "0.0.0.0"
    container_port = smtp["ports"][0].rsplit(":", 1)[1]
    assert container_port == "2525"
    assert "--port" not in words or words[words.index("--port") + 1] == container_port
    assert "2525" in " ".join(smtp["healthcheck"]["test"])
    assert smtp["environment"] == _compose()["services"]["web"]["environment"]  # same anchor


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${NAME:-default} and ${NAME:?error} for the values these tests read."""

    def one(match: re.Match[str]) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {rest}")
        return rest or ""

    return re.sub(r"\$\{(\w+)(:[-?])?([^}]*)\}", one, value)


def test_redis_requires_the_password_the_console_and_its_health_check_use():
    services = _compose()["services"]
    redis = services["redis"]
    words = _command_words(redis)
    assert words[0] == "redis-server"
    password = words[words.index("--requirepass") + 1]
    assert password == "${REDIS_PASSWORD:-change-me}"  # from the environment, default changed
    env = {"REDIS_PASSWORD": "0123abcd", "POSTGRES_PASSWORD": "p"}
    url = urlsplit(_interpolate(services["web"]["environment"]["LMI_REDIS_URL"], env))
    assert (url.scheme, url.hostname, url.password) == ("redis", "redis", "0123abcd")
    assert _interpolate(password, env) == "0123abcd"
    # The health check's redis-cli authenticates with the same password (REDISCLI_AUTH).
    assert redis["environment"]["REDISCLI_AUTH"] == password
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    # Nobody outside the compose network reaches the plain port.
    assert "ports" not in redis


def test_the_compose_file_says_how_to_serve_redis_with_tls_for_a_cluster():
    text = (BASE_DIR / "docker-compose.yml").read_text()
    notes = "\n".join(line.strip().lstrip("#") for line in text.splitlines() if "#" in line)
    needed = [
        '"--port", "0"',  # no plain port
        '"--tls-port", "6380"',
        "--tls-cert-file",
        "--tls-ca-cert-file",
        '"redis-cli", "--tls"',
        "rediss://:${REDIS_PASSWORD}@redis:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/tls/ca.crt",
    ]
    for words in needed:
        assert words in notes, words


def test_the_readme_documents_a_cluster_redis_with_password_and_tls_and_signed_messages():
    readme = (BASE_DIR / "README.md").read_text()
    section = readme[readme.index("## Cluster") :]
    section = section[: section.index("\n## ", 1)]
    for needed in ("requirepass", "rediss://", "ssl_cert_reqs=required", "--tls-port",
                   "signed", "HMAC", "nonce", "NTP", "Refused"):  # fmt: skip
        assert needed in section, needed
