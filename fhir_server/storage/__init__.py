"""SQLAlchemy Core schema, migrations, the tenant-bound repository, and storage chores."""
