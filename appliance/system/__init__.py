"""The system room: paths, atomic writes, restore journals, safe XML and JSON, errors,
maintenance, the rescue partition, the host's facts and its network."""
