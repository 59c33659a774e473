"""SMTP: the mail processing service and SMTP > Configuration > Maintenance."""
