"""Receiving from modalities and PACS: the node's own PS3.8 upper layer (association, PDUs,
negotiation), the C-ECHO / C-STORE SCP, the header scan, storage and TLS."""
