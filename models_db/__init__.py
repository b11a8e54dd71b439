"""SQLAlchemy models and sessions: the schema of loraplex's source of truth.

This package imports no sibling package; everything else builds on it.
"""
