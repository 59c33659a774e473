"""The appliance on disk: the one package that reads or writes the box LMI manages.

Everything the console knows about the mail-security appliance (firmware release, network
configuration, policy objects, the message store, the rescue partition) lives in files under a
single root directory, ``settings.APPLIANCE_ROOT``. Keeping every read and write behind this
package is what lets tests point the whole console at a temporary root, and is the boundary
between "the console" and "the box it manages".
"""
