"""Data: every format a user brings read into one row type, the held-out split, and a first recipe for a data file
(`distillery init`). Stages see rows, never formats."""
