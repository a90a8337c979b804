"""Settings (TOML file + environment), label sets and triage rules."""

from triagenode.config.settings import Settings, load_settings

__all__ = ["Settings", "load_settings"]
