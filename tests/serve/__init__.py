"""Tests of `deploykit serve`: one cell as local processes."""
