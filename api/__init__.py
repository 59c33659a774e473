"""The JSON API under /api/v1/ (Django Ninja), with its OpenAPI description."""
