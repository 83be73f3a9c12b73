"""The sandbox executor service."""
