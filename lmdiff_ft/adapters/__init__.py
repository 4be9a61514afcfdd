"""Adapters: presets → PEFT configs, and adapter directories that know their base."""
