"""The firmware room: bundles, the update feed, firmware slots, licences, the preflight checks,
the download spool and the firmware update logs."""
