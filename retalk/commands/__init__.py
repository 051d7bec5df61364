"""Sub-commands of the ``retalk`` CLI.

Each module here defines ``register(subparsers)``, which adds its parser(s) and sets ``func`` on them:
``func(args) -> int`` is the exit code. :mod:`retalk.cli` discovers the modules; there is no central list.
"""
