"""The HTTP side of candlewick and its command line."""
