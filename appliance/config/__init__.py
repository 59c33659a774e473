"""The configuration room: policy objects, mail policy and SMTP settings in both formats, the
2.8.0 -> 2.8.1 conversion, and configuration backups with their seal."""
