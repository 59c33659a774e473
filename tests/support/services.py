"""Real Redis and a real Celery worker for integration tests."""
