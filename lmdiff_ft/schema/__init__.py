"""The task file: its schema (types, choices, defaults) and its loading (YAML, overrides, validation)."""
