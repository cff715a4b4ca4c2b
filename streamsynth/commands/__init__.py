"""The command layer: every command's flags and what turns them into the library's settings (`args` holds the
pieces every parser shares). Nothing below this package parses a command line."""
