"""The mail room: the message store, what the mail service writes into it, its demo data, its
migration to the 2.8.1 format (counts, backup), retention and the purge, message tracking and
the processing figures."""
