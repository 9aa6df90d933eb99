"""Load tests: hundreds of nodes joining one coordinator over mutual TLS on loopback."""
