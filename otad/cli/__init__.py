"""Command-line entry points: the only place that parses arguments and exits."""
