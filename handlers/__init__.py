"""HTTP handlers: parse the request, call the service, write JSON."""
