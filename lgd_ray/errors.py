"""The errors every command prints as one line, no traceback (no dependencies, so that light entry points such as
`python -m lgd_ray.storage cat` import no models)."""


class UserError(Exception):
    """An error the user can fix; the message is one line naming the key, file or URI and the fix. The commands print
    it and exit with status 2 (lgd_ray.cli); its kinds below say where it comes from."""


class ConfigError(UserError, ValueError):
    """A bad configuration or input (a key, a value, a data set, a run folder); one line naming it and what is
    allowed."""
