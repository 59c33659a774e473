"""Updates > Updates & Licensing: firmware level, update logs, (later) download and install."""
