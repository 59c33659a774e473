"""The system room: paths, atomic writes, safe XML, errors, maintenance, the rescue partition,
the host's facts and its network."""
