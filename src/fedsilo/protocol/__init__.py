"""Typed records exchanged between the server and the sites."""
