"""The package version, in a module of its own so that the coordinator and the CLI can read it
without importing the public API (and, through it, the runtime)."""

__version__ = "0.1.0"
