"""The mail room: the message store, its migration to the 2.8.1 format, retention, message
tracking and the processing figures."""
