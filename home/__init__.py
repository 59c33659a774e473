"""Home: the home page, Home > System and Home > Resources, and the health endpoint."""
