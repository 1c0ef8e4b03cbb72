"""HTTP only: routes, content negotiation, headers, OperationOutcome rendering."""
