"""Helpers the tests share: real servers on free loopback ports, started and stopped by pid."""
