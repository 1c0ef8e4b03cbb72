"""Search: parsing, index extraction, query compilation."""
