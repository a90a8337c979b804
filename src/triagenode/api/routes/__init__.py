"""One module per resource of the admin API."""
