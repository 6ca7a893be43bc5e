"""Resolves how the CLI reaches the control plane: flags, then environment, then a context file."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from cloud.client import Connection
from edge_agent.errors import ConfigError, LocalStateError
from edge_agent.files import replace_atomically


@dataclasses.dataclass(frozen=True)
class CliContext:
    """The saved connection settings (`autoglm login` writes them). A plain dataclass: every
    CLI command reads it, and pydantic would cost each of them ~50 ms of start-up."""

    server: str = ""
    ca_cert: str = ""  # path of the CA certificate file
    token: str = ""
    tls_server_name: str = ""

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], where: Path) -> CliContext:
        names = {f.name for f in dataclasses.fields(cls)}
        bad = [str(k) for k, v in doc.items() if k not in names or not isinstance(v, str)]
        if bad:
            raise ConfigError(
                f"{where}: bad CLI context (keys: {', '.join(bad)}: unknown, or not text); "
                "rewrite it with `autoglm login`"
            )
        return cls(**doc)

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def default_context_path(env: Mapping[str, str]) -> Path:
    if env.get("AUTOGLM_CONTEXT"):
        return Path(env["AUTOGLM_CONTEXT"])
    base = Path(env.get("XDG_CONFIG_HOME") or Path(env.get("HOME", "~")) / ".config")
    return base.expanduser() / "autoglm" / "context.yaml"


DEFAULT_NAME = "default"


@dataclasses.dataclass
class ContextFile:
    """Named contexts (one per control plane) and the one commands use unless told."""

    current: str = ""
    contexts: dict[str, CliContext] = dataclasses.field(default_factory=dict)


def load_contexts(path: Path) -> ContextFile:
    """The context file; an older file holding one flat context reads as `default`."""
    if not path.exists():
        return ContextFile()
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the CLI context {path}: {exc.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: the CLI context is not valid YAML: {exc}") from None
    if doc is None:
        return ContextFile()
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the CLI context must be a mapping of keys to values")
    if "contexts" not in doc:
        return ContextFile(DEFAULT_NAME, {DEFAULT_NAME: CliContext.from_mapping(doc, path)})
    contexts = doc["contexts"]
    current = doc.get("current", "")
    if (
        not isinstance(contexts, dict)
        or not isinstance(current, str)
        or set(doc)
        - {
            "current",
            "contexts",
        }
    ):
        raise ConfigError(f"{path}: expected 'current' and a mapping 'contexts'; rewrite it "
                          "with `autoglm login`")  # fmt: skip
    parsed = {}
    for name, entry in contexts.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: context {name!r} must be a mapping")
        parsed[str(name)] = CliContext.from_mapping(entry, path)
    return ContextFile(current, parsed)


def load_context(path: Path, name: str = "") -> CliContext:
    """The named context, else the current one; empty when there is none."""
    file = load_contexts(path)
    chosen = name or file.current
    if not chosen:
        return CliContext()
    if chosen not in file.contexts:
        known = ", ".join(sorted(file.contexts)) or "none"
        raise ConfigError(f"{path}: no context named {chosen!r} (known: {known})")
    return file.contexts[chosen]


def save_contexts(path: Path, file: ContextFile) -> None:
    """Writes the contexts with mode 0600: they hold operator tokens."""
    doc = {"current": file.current, "contexts": {n: c.as_dict() for n, c in file.contexts.items()}}
    text = yaml.safe_dump(doc, sort_keys=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, text.encode("utf-8"), 0o600)
    except OSError as exc:
        raise LocalStateError(f"cannot write {path}: {exc.strerror}") from None


def save_context(path: Path, context: CliContext, name: str = DEFAULT_NAME) -> None:
    """Adds or replaces the named context and makes it the current one. A context file that
    cannot be read is moved aside (`.bad`) and started afresh: login is how it is repaired."""
    try:
        file = load_contexts(path)
    except ConfigError:
        path.replace(path.with_name(path.name + ".bad"))
        file = ContextFile()
    file.contexts[name] = context
    file.current = name
    save_contexts(path, file)


def resolve_connection(
    flags: Mapping[str, str | None], env: Mapping[str, str], timeout_s: float
) -> Connection:
    """Flags win over AUTOGLM_* environment variables, which win over the context file."""
    context_flag = flags.get("context")
    path = Path(context_flag) if context_flag else default_context_path(env)
    named = flags.get("context_name") or ""
    saved = load_context(path, named or env.get("AUTOGLM_CONTEXT_NAME", ""))

    def pick(flag: str, env_name: str, saved_value: str) -> str:
        # A context named on the command line is not mixed with AUTOGLM_* variables meant
        # for another control plane (its token would go to the wrong server).
        return flags.get(flag) or ("" if named else env.get(env_name, "")) or saved_value

    server = pick("server", "AUTOGLM_SERVER", saved.server)
    ca_path = pick("ca_cert", "AUTOGLM_CA_CERT", saved.ca_cert)
    token = pick("token", "AUTOGLM_TOKEN", saved.token)
    if not server or not ca_path or not token:
        missing = [
            n
            for n, v in (("server", server), ("CA certificate", ca_path), ("token", token))
            if not v
        ]
        raise ConfigError(
            f"no {' / '.join(missing)} to reach the control plane: run "
            "`autoglm login --server HOST:PORT "
            "--ca-cert FILE --token TOKEN`, or pass --server/--ca-cert/--token, or set "
            "AUTOGLM_SERVER/AUTOGLM_CA_CERT/AUTOGLM_TOKEN"
        )
    try:
        ca_pem = Path(ca_path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the CA certificate {ca_path}: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in ca_pem:
        raise ConfigError(
            f"the CA certificate {ca_path} is not a PEM certificate; use the control plane's "
            "ca.crt (STATE_DIR/ca.crt)"
        )
    return Connection(
        server=server,
        ca_pem=ca_pem,
        token=token,
        tls_server_name=pick("tls_server_name", "AUTOGLM_TLS_SERVER_NAME", saved.tls_server_name),
        timeout_s=timeout_s,
    )
