"""Running a federation across machines on Flower's deployment engine (SuperLink, SuperNodes)."""
