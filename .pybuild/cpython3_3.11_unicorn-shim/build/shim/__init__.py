"""unicorn-shim: zero-downtime deploys for pre-fork web servers under systemd."""

__version__ = "0.1.0"
