"""The qcow2 header check that stands between a guest-rewritten layer and
root's qemu-img, and the pinned qemu-img commands (no root needed)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from agentiso.privhelper.storage import commands as cmd
from agentiso.privhelper.storage import qcow2_header as qh
from agentiso.protocol.errors import ErrorCode
from tests.support.qcow2_attack import rewrite_header

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def qimg(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def layer(tmp: Path, backing: Path | None = None) -> Path:
    p = tmp / f"l{len(list(tmp.iterdir()))}.qcow2"
    extra = ["-u", "-b", str(backing), "-F", "qcow2"] if backing else []
    qimg("create", "-q", "-f", "qcow2", *extra, "-o", "cluster_size=65536", str(p), "64M")
    return p


def test_layers_the_helper_makes_pass(tmp_path: Path) -> None:
    base = layer(tmp_path)
    top = layer(tmp_path, base)
    qh.check_layer(qh.read_header(base), None, "base")
    h = qh.read_header(top)
    assert (h.backing_file, h.backing_format, h.data_file) == (str(base), "qcow2", None)
    qh.check_layer(h, base, "top")


def test_rewritten_backing_and_data_file_are_refused(tmp_path: Path) -> None:
    base = layer(tmp_path)
    top = layer(tmp_path, base)
    host = tmp_path / "host.img"
    host.write_bytes(b"h" * 4096)
    rewrite_header(top, backing="/etc/shadow", backing_format="raw", data_file=str(host))
    # The attack is real: QEMU itself follows the rewritten header.
    info = json.loads(qimg("info", "--output=json", "-U", str(top)))
    assert info["backing-filename"] == "/etc/shadow"
    assert info["format-specific"]["data"]["data-file"] == str(host)
    h = qh.read_header(top)
    assert h.data_file == str(host) and h.incompatible & qh.INCOMPAT_DATA_FILE
    with pytest.raises(qh.UntrustedImage) as e:
        qh.check_layer(h, base, "a layer")
    assert e.value.code is ErrorCode.CONFLICT
    msg = e.value.message
    assert "/etc/shadow" in msg and "data file" in msg and "destroy" in msg


@pytest.mark.parametrize("change", ["backing", "format", "data_only_ext", "no_backing"])
def test_each_rewrite_alone_is_refused(tmp_path: Path, change: str) -> None:
    base = layer(tmp_path)
    top = layer(tmp_path, base)
    kw: dict[str, str | None] = {"backing": str(base), "backing_format": "qcow2"}
    if change == "backing":
        kw["backing"] = str(tmp_path / "other.qcow2")
    elif change == "format":
        kw["backing_format"] = "raw"
    elif change == "no_backing":
        kw = {"backing": None}
    rewrite_header(top, **kw)  # type: ignore[arg-type]
    if change == "data_only_ext":
        # The extension without the feature bit: refused all the same.
        rewrite_header(top, backing=str(base), backing_format="qcow2", data_file="/x")
        buf = bytearray(top.read_bytes()[:65536])
        struct.pack_into(">Q", buf, 72, 0)
        with top.open("r+b") as f:
            f.write(bytes(buf))
    with pytest.raises(qh.UntrustedImage):
        qh.check_layer(qh.read_header(top), base, "top")


@pytest.mark.parametrize("mangle", [
    lambda b: b"XXXX" + b[4:],                                    # magic
    lambda b: b[:4] + struct.pack(">I", 9) + b[8:],               # version
    lambda b: b[:8] + struct.pack(">QI", 65530, 100) + b[20:],    # backing past the cluster
    lambda b: b[:8] + struct.pack(">QI", 512, 5000) + b[20:],     # backing name too long
    lambda b: b[:100] + struct.pack(">I", 70000) + b[104:],       # header length
    lambda b: b[:112] + struct.pack(">II", 0xE2792ACA, 2**31) + b[120:],  # extension length
    lambda b: b[:50],                                             # truncated
    lambda b: b"",
])
def test_hostile_headers_never_crash_the_parser(tmp_path: Path, mangle: object) -> None:
    top = layer(tmp_path, layer(tmp_path))
    data = top.read_bytes()[:65536]
    top.write_bytes(mangle(data))  # type: ignore[operator]
    with pytest.raises(qh.UntrustedImage):
        qh.read_header(top)


def test_read_header_does_not_follow_symlinks(tmp_path: Path) -> None:
    target = layer(tmp_path)
    link = tmp_path / "link.qcow2"
    link.symlink_to(target)
    with pytest.raises(OSError):
        qh.read_header(link)


def test_pinned_chain_gives_every_backing_down_to_null() -> None:
    chain = [Path("/s/top"), Path("/s/mid"), Path("/s/base")]
    spec = cmd.pinned_chain(chain)
    assert spec == {
        "driver": "qcow2", "file": {"driver": "file", "filename": "/s/top"},
        "backing": {
            "driver": "qcow2", "file": {"driver": "file", "filename": "/s/mid"},
            "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "/s/base"},
                        "backing": None},
        },
    }
    assert "driver" not in cmd.pinned_chain(chain, with_driver=False)
    argv = cmd.qemu_img_resize_pinned(chain, 1 << 30)
    assert argv[:3] == ["qemu-img", "resize", "-q"] and argv[-1] == str(1 << 30)
    assert json.loads(argv[3].removeprefix("json:")) == spec
    with pytest.raises(ValueError):
        cmd.pinned_chain([Path("rel")])
    with pytest.raises(ValueError):
        cmd.pinned_chain([])


def test_pinned_commands_never_open_a_rewritten_backing(tmp_path: Path) -> None:
    """Defence in depth below the header check: even on a layer whose header
    names another file, the pinned resize and rebase open only the chain
    given (the decoy would fail the command if opened: it is not qcow2)."""
    base = layer(tmp_path)
    mid = layer(tmp_path, base)
    top = layer(tmp_path, mid)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 1M", str(mid)], check=True,
                   capture_output=True)
    decoy = tmp_path / "decoy"
    decoy.write_bytes(b"not an image")
    decoy.chmod(0)
    rewrite_header(mid, backing=str(decoy), backing_format="qcow2")
    rewrite_header(top, backing=str(decoy), backing_format="qcow2")
    subprocess.run(cmd.qemu_img_resize_pinned([top, mid, base], 128 << 20), check=True)
    subprocess.run(cmd.qemu_img_rebase_pinned([top, mid, base], [base]), check=True)
    subprocess.run(cmd.qemu_img_set_backing(top, base), check=True)
    h = qh.read_header(top)
    qh.check_layer(h, base, "top")
    out = subprocess.run(["qemu-io", "-r", "-c", "read -P 0x5a 0 1M", str(top)],
                         capture_output=True, text=True, check=True).stdout
    assert "Pattern verification failed" not in out
