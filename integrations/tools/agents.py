"""Per-agent tool sets: the ``agents:`` section of the services file.

::

    agents:
      support_bot:
        description: answers customers
        tools:
          github: [get_repo, create_issue]   # these operations of github
          stub: "*"                          # every operation of stub

Without an ``agents:`` section every agent may use every tool. With one, an agent may use
exactly what its entry lists, and an agent it does not name may use nothing. A caller that
names no agent (an operator's own script) is not restricted.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field

from integrations.config import get_settings
from integrations.config.loading import entries, interpolate, read_file, validate
from integrations.config.schema import Strict
from integrations.errors import ConfigError
from integrations.services import Service, get_services


class AgentTools(Strict):
    name: str
    description: str = ""
    #: Service name -> the operations the agent may use, or ``"*"`` for all of them.
    tools: dict[str, list[str] | Literal["*"]] = Field(default_factory=dict)

    def allows(self, service: str, operation: str) -> bool:
        ops = self.tools.get(service)
        return ops == "*" or (ops is not None and operation in ops)


def load_agents(path: Path, services: dict[str, Service]) -> dict[str, AgentTools]:
    """The ``agents:`` section, each service and operation checked against ``services``."""
    out: dict[str, AgentTools] = {}
    for name, (where, spec) in entries(read_file(path), "agents").items():
        agent = validate(AgentTools, interpolate(spec, where), where, name=name)
        for service, ops in agent.tools.items():
            svc = services.get(service)
            if svc is None:
                raise ConfigError(f"{where}.tools.{service}: no such service")
            for op in [] if ops == "*" else ops:
                if op not in svc.catalog():
                    raise ConfigError(f"{where}.tools.{service}: {op!r} is not one of its operations")
        out[name] = agent
    return out


@functools.cache
def get_agents() -> dict[str, AgentTools]:
    return load_agents(get_settings().services_file, get_services())


def allowed(agent: str | None, service: str, operation: str) -> bool:
    """Whether ``agent`` may use ``service``'s ``operation`` (see the module's rules)."""
    agents = get_agents()
    if agent is None or not agents:
        return True
    entry = agents.get(agent)
    return entry is not None and entry.allows(service, operation)
