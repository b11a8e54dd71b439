"""Webhooks: secrets and signatures, events, SSRF-safe delivery (DESIGN §8)."""
