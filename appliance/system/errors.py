"""Exceptions raised by the appliance package.

They are few and specific so that views can turn each into a clear message instead of a 500.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base class for errors about the appliance's state on disk."""


class ApplianceNotInitialized(ApplianceError, RuntimeError):
    """The appliance root is missing or was never set up (run ``manage.py init_appliance``)."""


class ApplianceExists(ApplianceError, RuntimeError):
    """Refusing to create an appliance over an existing one without ``force``."""


class UnsafeXMLError(ApplianceError, ValueError):
    """An XML document carries a DOCTYPE or entity declarations, which we never accept.

    The appliance's own XML never needs them, and they are the vehicle for XXE and
    entity-expansion ("billion laughs") attacks, so their presence means tampering.
    """


class MalformedApplianceFile(ApplianceError, ValueError):
    """A configuration file exists but cannot be parsed into what the appliance expects."""
