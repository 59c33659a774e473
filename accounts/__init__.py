"""Users, roles (Administrator, Read-only), login and logout."""
