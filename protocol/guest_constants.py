"""What both ends of the guest channel agree on besides the messages.

Where the channel is (the virtio-serial port's name, the vsock port, the fw_cfg
entry with the per-VM secret), how big a frame may be, the raw sync markers of
the session handshake and its timing.  The agent (guest/), the VM engine and
relay (privhelper/), the host client (frontend/) and the image build (images/)
all take these from here; docs/guest-protocol.md explains them.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Bump on any incompatible change to the guest protocol's messages.
GUEST_PROTOCOL_VERSION = 1

# --- where the channel is ----------------------------------------------------------------

#: Name of the agent's virtio-serial port; the guest finds it in
#: /sys/class/virtio-ports/*/name, QEMU sets it with ``virtserialport,name=``.
AGENT_PORT_NAME = "org.agentiso.agent.0"
#: AF_VSOCK port the agent listens on where the host has vhost-vsock.
AGENT_VSOCK_PORT = 5000
#: fw_cfg entry carrying the per-VM secret (``-fw_cfg name=...``); the guest
#: reads it at SECRET_SYSFS_PATH once the qemu_fw_cfg module is loaded.
SECRET_FW_CFG_NAME = "opt/org.agentiso/secret"
SECRET_SYSFS_PATH = f"/sys/firmware/qemu_fw_cfg/by_name/{SECRET_FW_CFG_NAME}/raw"
#: Bounds of the per-VM secret (the ``Auth`` message enforces them too).
SECRET_MIN_BYTES = 16
SECRET_MAX_BYTES = 256

# --- limits ------------------------------------------------------------------------------

#: Largest frame either side accepts on the guest channel.
GUEST_MAX_FRAME = 4 * MiB
#: Largest frame the agent accepts before a vsock connection authenticated:
#: an ``Auth`` frame is small.
AUTH_MAX_FRAME = 4096
#: Largest data payload of one message (file chunk, inline output, stdin).
MAX_CHUNK = 1 * MiB
#: Chunk size a client uses unless told otherwise.
DEFAULT_CHUNK = 256 * KiB
#: Largest inline output per stream of a collected (non-streaming) exec.
MAX_INLINE_OUTPUT = 1 * MiB
#: Largest credit window (in chunks) of one stream.
MAX_WINDOW = 64
#: ``window * chunk_size`` of one transfer must not exceed this.
MAX_WINDOW_BYTES = 16 * MiB
#: Requests the agent serves at once per connection; further ones wait.
DEFAULT_MAX_INFLIGHT = 64

# --- the session handshake ---------------------------------------------------------------

#: Sent by the agent, raw (not framed), right before each Hello.  A host that
#: (re)connects to a virtio-serial port may first receive stale bytes queued on
#: the previous connection; it discards everything up to and including this
#: marker, then decodes frames.
GUEST_SYNC_MAGIC = b"\xffAGENTISO-GUEST-SYNC-1\xff"
#: Sent by the host, raw and followed by SYNC_NONCE_LEN random bytes, when it
#: (re)connects and to recover from a framing error: the agent drops its
#: decoder state and in-flight requests and answers with GUEST_SYNC_MAGIC and a
#: Hello whose ``sync_nonce`` echoes the nonce.  The host ignores every Hello
#: but the one with its nonce, so stale greetings cannot confuse it.  (A guest
#: virtio port may not notice a host that disconnects and reconnects quickly:
#: this handshake does not depend on noticing.)
HOST_SYNC_MAGIC = b"\xffAGENTISO-HOST-SYNC-1\xff"
SYNC_NONCE_LEN = 8
#: How often a host sends its marker again while the agent has not answered
#: (the agent may be booting, or abandoning a frame of a vanished host).
SYNC_RETRY_S = 1.0
#: vsock: how long the agent waits for the ``Auth`` frame.
AUTH_TIMEOUT_S = 10.0
