"""Other servers the overhead benchmark compares the wrapper with."""
