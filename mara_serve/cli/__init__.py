"""The `mara` command line (`main.py`); one module per subcommand. Nothing else imports it."""
