"""The error every command prints as one line (no dependencies, so that light entry points such as
`python -m lgd_ray.storage cat` import no models)."""


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key and what is allowed."""
