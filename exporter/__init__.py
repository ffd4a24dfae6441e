"""Prometheus exporter for WhatsApp gateway providers."""

__version__ = "0.1.0"
