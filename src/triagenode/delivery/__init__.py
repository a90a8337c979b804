"""Sending results to the PACS: the export outbox, the C-STORE SCU exporter with one lane
per destination, and the destination probe behind ``/readyz``."""
