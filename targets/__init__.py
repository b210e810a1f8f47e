"""Target descriptions (TOML data files), shipped as package data."""
