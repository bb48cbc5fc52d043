"""Test helpers: a Lightning Stream stand-in (standin) and fixtures for migration tests."""
