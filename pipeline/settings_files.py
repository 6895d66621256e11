"""Settings read from mounted files (``IOTAD_<NAME>_FILE``), and secrets handed to child processes as files.

Any setting ``<name>`` can be given as ``IOTAD_<NAME>_FILE=/path``: the file's content (one trailing
newline removed) is the value. It is meant for secrets mounted by Docker/Kubernetes
(``IOTAD_INFLUX_TOKEN_FILE=/run/secrets/influx_token``) so they never sit in the environment, where
``ps e``, ``/proc/<pid>/environ`` and crash reports can see them. The value is resolved when the
settings load; a missing or unreadable file, or both ``IOTAD_X`` and ``IOTAD_X_FILE`` set, is an error
that names the variable and the path, never the content.

Secret settings are :class:`pydantic.SecretStr`: ``repr``/``str`` show ``**********``, so printing or
logging a :class:`~pipeline.settings.Settings` never reveals them. :func:`secret_files_env` writes them
to private files for a child process (``iotad up`` workers) and returns the ``*_FILE`` variables.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource
from pydantic_settings.exceptions import SettingsError

FILE_SUFFIX = "_FILE"
MAX_FILE_BYTES = 1 << 20


_CONFIGURED: Any = object()  # "the env_file of the settings class's model_config"


def _dotenv(settings_cls: type[BaseSettings], env_file: Any = _CONFIGURED) -> dict[str, str]:
    from dotenv import dotenv_values

    if env_file is _CONFIGURED:
        env_file = settings_cls.model_config.get("env_file")
    if not env_file:
        return {}
    files: Iterable[Any] = env_file if isinstance(env_file, list | tuple) else [env_file]
    out: dict[str, str] = {}
    for f in files:
        path = Path(f).expanduser()
        if path.is_file():
            out.update({k.upper(): v for k, v in dotenv_values(path).items() if v is not None})
    return out


def read_value_file(variable: str, path: str) -> str:
    """The content of the file ``variable`` points to, one trailing newline removed."""
    p = Path(path).expanduser()
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SettingsError(f"{variable}={path}: file is {size} bytes, more than {MAX_FILE_BYTES}")
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"{variable}={path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{variable}={path}: not UTF-8 text") from None
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


class ValueFileSettingsSource(PydanticBaseSettingsSource):
    """``IOTAD_<NAME>_FILE`` for every field ``<name>`` (unless ``<name>_file`` is a field itself).

    One instance per layer: ``layer="env"`` reads the process environment (place it right after the
    environment source), ``layer="dotenv"`` the ``.env`` file (right after the dotenv source), so a file
    named in the environment beats a value in ``.env``, like the variables themselves. Within one layer,
    setting both ``IOTAD_X`` and ``IOTAD_X_FILE`` is refused.
    """

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        layer: str = "env",
        environ: Mapping[str, str] | None = None,
        env_file: Any = _CONFIGURED,
    ) -> None:
        super().__init__(settings_cls)
        if layer not in ("env", "dotenv"):
            raise ValueError(f"layer must be env or dotenv, not {layer!r}")
        self.layer = layer
        self._environ = environ
        self._env_file = env_file  # the dotenv source's effective env_file (Settings(_env_file=...) included)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # all the work is in __call__

    def _variables(self) -> dict[str, str]:
        if self.layer == "dotenv":
            return _dotenv(self.settings_cls, self._env_file)
        return {k.upper(): v for k, v in (os.environ if self._environ is None else self._environ).items()}

    def __call__(self) -> dict[str, Any]:
        prefix = str(self.settings_cls.model_config.get("env_prefix", "")).upper()
        env = self._variables()
        fields = self.settings_cls.model_fields
        out: dict[str, Any] = {}
        for name in fields:
            if f"{name}{FILE_SUFFIX.lower()}" in fields:
                continue  # IOTAD_<NAME>_FILE is that other field's own variable
            direct = f"{prefix}{name}".upper()
            variable = direct + FILE_SUFFIX
            path = env.get(variable, "")
            if not path:
                continue
            if env.get(direct):
                raise SettingsError(f"both {direct} and {variable} are set: use one")
            out[name] = read_value_file(variable, path)
        return out


def secret_fields(model: type[BaseModel]) -> list[str]:
    """Names of the fields typed :class:`SecretStr` (or ``SecretStr | None``)."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if ann is SecretStr or SecretStr in getattr(ann, "__args__", ()):
            out.append(name)
    return out


def secret_files_env(settings: BaseSettings, directory: Path, prefix: str = "IOTAD_") -> dict[str, str]:
    """Write every non-empty secret setting to ``directory/<name>`` (mode 0600, directory 0700) and return
    ``{IOTAD_<NAME>_FILE: path}`` for a child process's environment."""
    env: dict[str, str] = {}
    for name in secret_fields(type(settings)):
        value = getattr(settings, name)
        secret = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not secret:
            continue
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secret)
        env[f"{prefix}{name.upper()}{FILE_SUFFIX}"] = str(path.resolve())
    return env


def reveal(value: SecretStr | str | None) -> str:
    """The plain value of a secret setting ("" when unset), for the one place that must send it."""
    if value is None:
        return ""
    return value.get_secret_value() if isinstance(value, SecretStr) else value
