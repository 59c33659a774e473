"""The firmware room: signing keys, bundles (verified, built, unpacked), the update feed,
firmware slots and their tree manifests, licences, the preflight checks, the download spool and
the firmware update logs."""
