"""The EICAR test file: the one signature the mail service's virus check looks for.

A harmless string every anti-virus product detects by agreement (eicar.org), so the virus path
can be shown and tested without real malware: the demo message store's virus quarantine
carries it in its attachments, and the install's validation report sends it through the mail
service. Kept here, below both the mail service (``smtp.engine``) and the demo data.
"""

# Spelled in two halves so that a virus scanner on a developer's machine does not quarantine
# this source file.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_NAME = "EICAR-Test-File"
