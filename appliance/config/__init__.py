"""The configuration room: policy objects, mail policy and SMTP settings in both formats, the
2.8.1 format and the conversion to it, and configuration backups (their file format, seal, files,
checks, diff and restore)."""
