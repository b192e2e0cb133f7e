"""Checks nemo-tool's tar writer against Python's tarfile (the library NeMo uses).

Run by `tests/tar_interop.rs` (any Python 3.8+; only the standard library):

  test_tar.py list ARCHIVE        print a JSON list of members as NeMo's reader sees them
  test_tar.py make SRC_DIR OUT    write SRC_DIR the way NeMo does (tar.add(dir, arcname=".")),
                                  with mtime/uid/gid/names reset so the bytes are reproducible
"""

import hashlib
import json
import sys
import tarfile

# Members larger than this are listed without hashing (the sparse 9 GiB test).
HASH_LIMIT = 64 << 20


def nemo_open(path):
    """SaveRestoreConnector._tar_open: plain tar first, then gzip."""
    try:
        return tarfile.open(path, "r:")
    except tarfile.ReadError:
        return tarfile.open(path, "r:gz")


def list_members(path):
    out = []
    with nemo_open(path) as tar:
        for m in tar.getmembers():
            entry = {"name": m.name, "size": m.size, "type": "dir" if m.isdir() else "file" if m.isfile() else "other"}
            if m.isfile() and m.size <= HASH_LIMIT:
                entry["sha256"] = hashlib.sha256(tar.extractfile(m).read()).hexdigest()
            out.append(entry)
    print(json.dumps(out))


def reset(info):
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def make(src, out):
    with tarfile.open(out, "w:") as tar:
        tar.add(src, arcname=".", filter=reset)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "list":
        list_members(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
