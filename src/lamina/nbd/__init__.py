"""The NBD front end: exports lamina volumes to the kernel's NBD client."""

from lamina.nbd.protocol import (
    NEED_DATA,
    Abort,
    Command,
    Disconnect,
    Event,
    ExportChosen,
    ExportInfo,
    NbdErrno,
    NbdProtocolError,
    NbdServer,
    Request,
    State,
    reply,
)

__all__ = [
    "NEED_DATA",
    "Abort",
    "Command",
    "Disconnect",
    "Event",
    "ExportChosen",
    "ExportInfo",
    "NbdErrno",
    "NbdProtocolError",
    "NbdServer",
    "Request",
    "State",
    "reply",
]
