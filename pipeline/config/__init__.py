"""Configuration: the typed schemas (schema.py), the field constraints they use (fields.py), composition with
Hydra and readable errors (compose.py), and the checks that need more than one field or the shards (checks.py)."""
