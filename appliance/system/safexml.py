"""Parsing the appliance's XML configuration without the classic XML attacks.

Configuration XML can arrive from outside (a restored configuration snapshot, a cluster peer),
so it is parsed as untrusted: no entity substitution, no DTD loading, no network, and libxml2's
size limits on. On top of that any DOCTYPE at all is refused, because the appliance's own files
never carry one and an internal subset is exactly how XXE and "billion laughs" documents work.
"""

from __future__ import annotations

from lxml import etree

from appliance.system.errors import MalformedApplianceFile, UnsafeXMLError


def _parser() -> etree.XMLParser:
    # A fresh parser per call: lxml parsers keep state and are not safe to share across threads.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        dtd_validation=False,
        remove_blank_text=False,
    )


def parse_xml(data: bytes) -> etree._Element:
    """Parse ``data`` and return the root element, refusing DOCTYPEs and entity declarations.

    Raises :class:`UnsafeXMLError` for a DOCTYPE (internal or external DTD, entity declarations)
    or leftover entity references, and :class:`MalformedApplianceFile` for a syntax error.
    """
    if not isinstance(data, bytes | bytearray):
        raise TypeError("parse_xml() takes bytes, so the document's own encoding declaration wins")
    try:
        tree = etree.ElementTree(etree.fromstring(bytes(data), parser=_parser()))
    except etree.XMLSyntaxError as exc:
        raise MalformedApplianceFile(f"malformed XML: {exc}") from exc
    docinfo = tree.docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise UnsafeXMLError("XML with a DOCTYPE or entity declarations is not accepted")
    root = tree.getroot()
    for node in root.iter():
        if isinstance(node, etree._Entity):
            raise UnsafeXMLError(f"XML with entity references is not accepted: {node.text}")
    return root
