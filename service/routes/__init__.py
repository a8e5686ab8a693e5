"""The service's routers, one per area; each reads the shared ``AppState`` (``service.state.state_of``)."""
