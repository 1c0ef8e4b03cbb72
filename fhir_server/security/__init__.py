"""Keys, encryption, blind indexes (and, later, authorization and audit)."""
