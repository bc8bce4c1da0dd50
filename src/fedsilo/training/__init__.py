"""Local training: the one loop every site runs, its loss and its compute precision."""
