"""Load generators and benchmarks: tools run by hand, never imported by the server."""
