"""/v1/webhook_endpoints: tenants subscribe URLs to job events (DESIGN §8)."""
