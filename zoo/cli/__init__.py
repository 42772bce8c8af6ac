"""The `zoo` command line. One module per command; torch is imported only by the commands that
need it, inside their `run`, so `zoo --help` stays fast."""
