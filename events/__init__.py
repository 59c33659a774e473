"""System > Events: the appliance's event log."""
