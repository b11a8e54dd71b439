"""Unit tests for the webhook package."""
