"""The run's configuration: the schema (schema.py) and reading and writing config files (parse.py)."""
