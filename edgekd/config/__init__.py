"""The options of the commands (one table of defaults, bounds and help) and recipe files."""
