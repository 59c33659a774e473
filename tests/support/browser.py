"""Playwright driving Debian chromium for browser tests."""
