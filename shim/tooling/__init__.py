"""Operator tooling: `check`, the server-config evaluation, the systemd generator, the man page.
Never imported by a running shim."""
