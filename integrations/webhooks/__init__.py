"""Webhooks: verified incoming deliveries and signed outgoing ones."""
