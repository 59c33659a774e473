"""The one job engine: every long piece of work (downloads, installs, backups, purges,
rollouts) is a :class:`jobs.models.Job`, claimed, kept alive, reported and recovered here."""
