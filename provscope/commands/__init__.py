"""One module per ``provscope`` subcommand; each defines ``register(subparsers)``."""
