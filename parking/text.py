"""Free text the API stores: PostgreSQL text cannot hold a NUL, so every stored text refuses it
in its schema (a 422 in the one error shape) rather than failing in the database (a 500)."""

NO_NUL = r"^[^\x00]*$"
