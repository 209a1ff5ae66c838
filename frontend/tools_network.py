"""The network tools: port_forward, port_forward_remove, network_policy."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Annotated, Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

from .catalog import WorkspaceRecord
from .results import AllowRule, Forward, ForwardResult, NetworkPolicyResult
from .toolerrors import BadArgument, tool_errors
from .tools_workspace import WorkspaceRef

if TYPE_CHECKING:
    from .server import Runtime

Port = Annotated[int, Field(ge=1, le=65535)]
HostPort = Annotated[int, Field(ge=1024, le=65535, description="Host port (>= 1024)")]
Proto = Literal["tcp", "udp"]
GroupName = Annotated[str, Field(min_length=1, max_length=48, pattern=r"^[a-z0-9][a-z0-9-]*$")]


class AllowIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cidr: Annotated[str, Field(min_length=2, max_length=43, description=(
        "Network or address, e.g. 192.0.2.0/24, 198.51.100.7, 2001:db8::/32"))]
    ports: Annotated[list[Annotated[str, Field(pattern=r"^[0-9]{1,5}(-[0-9]{1,5})?$")]],
                     Field(max_length=32, description="'443' or '8000-8100'; empty: all")] = []
    protocol: Literal["tcp", "udp", "any"] = "any"


def _port_range(text: str) -> list[int]:
    first, _, last = text.partition("-")
    a, b = int(first), int(last or first)
    if not (1 <= a <= b <= 65535):
        raise BadArgument(f"port range {text!r} is not within 1-65535 in order\n"
                          "Give a port like '443' or a range like '8000-8100'.")
    return [a, b]


def _allow(rules: list[AllowIn]) -> list[dict[str, Any]]:
    out = []
    for r in rules:
        try:
            net = ipaddress.ip_network(r.cidr, strict=False)
        except ValueError:
            raise BadArgument(f"{r.cidr!r} is not an IP network\n"
                              "Give an address or a network in CIDR form.") from None
        out.append({"cidr": str(net), "protocol": r.protocol,
                    "ports": [_port_range(p) for p in r.ports]})
    return out


def _result(rec: WorkspaceRecord, applied: bool) -> NetworkPolicyResult:
    net = rec.network
    return NetworkPolicyResult(
        workspace=rec.name, allow_internet=rec.allow_internet,
        allow=[AllowRule(cidr=a["cidr"], protocol=a["protocol"],
                         ports=[f"{p[0]}" if p[0] == p[1] else f"{p[0]}-{p[1]}"
                                for p in a["ports"]])
               for a in net.get("allow", [])],
        peers=list(net.get("peers", [])), groups=list(net.get("groups", [])),
        forwards=[Forward(**f) for f in net.get("forwards", [])], applied=applied,
    )


def register(app: MCPServer[Any], rt: Runtime) -> None:
    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=False), description=(
        "Forward a host port to a port in the workspace, so the host reaches a server in it "
        "at 127.0.0.1:host_port. Omit host_port to get a free one. Only your own user (and "
        "root) reach it from this host; set external to let other hosts reach it at the "
        "host's addresses too. Kept across restarts."))
    @tool_errors
    async def port_forward(
        workspace: WorkspaceRef,
        guest_port: Annotated[Port, Field(description="Port the server listens on in the guest")],
        host_port: HostPort | None = None,
        protocol: Proto = "tcp",
        external: Annotated[bool, Field(description=(
            "Also reachable from other hosts at this host's addresses (default: only from "
            "this host, by your own user)"))] = False,
    ) -> ForwardResult:
        rec, port = await rt.ws.forward_add(workspace, guest_port=guest_port,
                                            host_port=host_port, protocol=protocol,
                                            external=external)
        return ForwardResult(workspace=rec.name, host_port=port, guest_port=guest_port,
                             protocol=protocol, external=external)

    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=False), description=(
        "Remove a port forward made with port_forward."))
    @tool_errors
    async def port_forward_remove(
        workspace: WorkspaceRef, host_port: HostPort, protocol: Proto = "tcp",
    ) -> NetworkPolicyResult:
        rec = await rt.ws.forward_remove(workspace, host_port=host_port, protocol=protocol)
        return _result(rec, applied=str(rec.state) == "running")

    @app.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=True), description=(
        "Set what the workspace may reach on the network; omitted fields stay as they are. "
        "By default a workspace reaches no other network and no other workspace. "
        "allow_internet turns outbound access on (with `allow`, only to those networks and "
        "ports); `peers` lets it talk with those workspaces of yours, `groups` with every "
        "workspace of yours in the same group. Applied at once if it runs."))
    @tool_errors
    async def network_policy(
        workspace: WorkspaceRef,
        allow_internet: bool | None = None,
        allow: Annotated[list[AllowIn], Field(max_length=64)] | None = None,
        peers: Annotated[list[Annotated[str, Field(min_length=1, max_length=80)]],
                         Field(max_length=64, description="Workspace names or ids")] | None = None,
        groups: Annotated[list[GroupName], Field(max_length=16)] | None = None,
    ) -> NetworkPolicyResult:
        rec, vm = await rt.ws.set_network(
            workspace, allow_internet=allow_internet,
            allow=None if allow is None else _allow(allow), peers=peers, groups=groups)
        return _result(rec, applied=vm is not None)
