"""Webhook delivery: the sender thread of every worker and the deliver task."""
