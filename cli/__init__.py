"""The `rpt` command line: one click group, one small file per command."""
