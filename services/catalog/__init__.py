"""The catalog: the mesh's single source of truth, and the only code that
touches the database."""
