"""fmkit's built-in plugins. Each module is an ordinary plugin, registered like an entry point."""
