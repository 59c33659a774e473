"""docker-compose.yml cannot run here (no Docker engine), so it is kept right by this test."""

from __future__ import annotations

import shlex
from pathlib import Path

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
    assert environment["LMI_REDIS_URL"] == "redis://redis:6379/0"
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
