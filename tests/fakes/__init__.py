"""Fakes at the seams: real servers speaking other programs' wire formats."""
