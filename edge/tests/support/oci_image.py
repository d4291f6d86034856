#!/usr/bin/env python3
"""Builds an OCI image archive (an image layout in a tar) from the host's
static busybox, with no registry and no container engine:

    oci_image.py OUT.tar REFERENCE [CMD...]

REFERENCE is a full reference (docker.io/library/name:tag): containerd
stores the layout's ref.name annotation as written. The image has
/bin/busybox with its common applets as symlinks, /tmp, /etc, and runs
CMD (default: sleep for ever). Standard library only.
"""

import gzip
import hashlib
import io
import json
import sys
import tarfile

APPLETS = ["sh", "sleep", "echo", "cat", "head", "tail", "tr", "touch", "test",
           "ls", "id", "dd", "rm", "mkdir", "mv", "cp", "true", "false", "wc",
           "env", "date", "grep", "ps", "hostname", "uname", "tar", "printf",
           "seq", "wget", "httpd", "ip", "tty", "stty"]


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def add(tar: tarfile.TarFile, name: str, data: bytes | None = None, **attrs) -> None:
    info = tarfile.TarInfo(name)
    for key, value in attrs.items():
        setattr(info, key, value)
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ["bin", "tmp", "etc", "dev", "proc", "sys", "root"]:
            add(tar, d, type=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        with open("/bin/busybox", "rb") as f:
            add(tar, "bin/busybox", f.read(), mode=0o755)
        for applet in APPLETS:
            add(tar, "bin/" + applet, type=tarfile.SYMTYPE, linkname="busybox")
        add(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", mode=0o644)
        add(tar, "etc/group", b"root:x:0:\n", mode=0o644)
    return buf.getvalue()


def main() -> None:
    out, ref = sys.argv[1], sys.argv[2]
    cmd = sys.argv[3:] or ["/bin/sleep", "2147483647"]
    diff = layer()
    gz = gzip.compress(diff, mtime=0)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [digest(diff)]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest(gz), "size": len(gz)}],
    }).encode()
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": digest(manifest), "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": ref}}],
    }).encode()
    with tarfile.open(out, "w") as tar:
        add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}', mode=0o644)
        add(tar, "index.json", index, mode=0o644)
        for blob in (gz, config, manifest):
            add(tar, "blobs/sha256/" + digest(blob)[7:], blob, mode=0o644)


if __name__ == "__main__":
    main()
