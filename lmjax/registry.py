"""Named choices in a config (model, attention, profiler, dataset…): one registry per choice."""


class ConfigError(ValueError):
    """A user error in the configuration: reported as one line, exit status 2."""


class Registry:
    def __init__(self, config_key: str):
        self.config_key = config_key
        self._entries = {}

    def register(self, name: str):
        def add(obj):
            self._entries[name] = obj
            return obj

        return add

    def names(self):
        return sorted(self._entries)

    def get(self, name: str):
        if name not in self._entries:
            raise ConfigError(
                f"Unknown {self.config_key.split('.')[-1]} {name!r} in {self.config_key}; "
                f"choose one of: {', '.join(self.names())}."
            )
        return self._entries[name]
