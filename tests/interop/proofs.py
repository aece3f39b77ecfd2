"""An independent implementation of the formats `note`, `merkle` and
`checkpoint` produce, written from the specs (C2SP signed-note,
tlog-checkpoint, tlog-cosignature; RFC 9162 §2.1) with Python's hashlib and
the `cryptography` package, and none of the crate's code.

Reads a JSON document on stdin: what the crate made (keys, a signed note, a
cosigned checkpoint, roots and proofs over given leaves) and a seed. Writes
a JSON document on stdout: `checks` (name -> "ok" or what failed) for every
check of the crate's artifacts, and `made`: keys, a note, a checkpoint and
proofs made here from the seed, for the crate to check in turn.
"""

import base64
import hashlib
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

ED25519 = 0x01
COSIGNATURE = 0x04
EM_DASH = "\u2014"


# ---------------------------------------------------------------- RFC 9162 §2.1


def leaf_hash(data):
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def split(n):
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(leaves):
    """MTH(D[n]) of §2.1.1, recursively, over leaf *hashes*."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = split(len(leaves))
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def path(m, leaves):
    """PATH(m, D[n]) of §2.1.3.1."""
    if len(leaves) <= 1:
        return []
    k = split(len(leaves))
    if m < k:
        return path(m, leaves[:k]) + [mth(leaves[k:])]
    return path(m - k, leaves[k:]) + [mth(leaves[:k])]


def subproof(m, leaves, whole):
    """SUBPROOF(m, D[n], b) of §2.1.4.1."""
    n = len(leaves)
    if m == n:
        return [] if whole else [mth(leaves)]
    k = split(n)
    if m <= k:
        return subproof(m, leaves[:k], whole) + [mth(leaves[k:])]
    return subproof(m - k, leaves[k:], False) + [mth(leaves[:k])]


def shift_while_even(fn, sn):
    """Right-shift both until fn is odd or 0 (§2.1.3.2 and §2.1.4.2)."""
    while fn & 1 == 0 and fn != 0:
        fn >>= 1
        sn >>= 1
    return fn, sn


def verify_inclusion(leaf, index, size, proof, root):
    """§2.1.3.2."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            fn, sn = shift_while_even(fn, sn)
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(first, second, first_hash, second_hash, proof):
    """§2.1.4.2, with the equal-sizes case (empty proof, equal roots)."""
    if first == second:
        return not proof and first_hash == second_hash
    if first == 0 or first > second or not proof:
        return False
    if first & (first - 1) == 0:
        proof = [first_hash] + list(proof)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            fn, sn = shift_while_even(fn, sn)
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_hash and sr == second_hash and sn == 0


# ------------------------------------------------------------ C2SP signed-note


def key_id(name, key_type, public):
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([key_type]) + public).digest()
    return digest[:4]


def raw_public(private):
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def make_keys(name, key_type, seed):
    private = Ed25519PrivateKey.from_private_bytes(seed)
    public = raw_public(private)
    kid = key_id(name, key_type, public).hex()
    skey = "PRIVATE+KEY+%s+%s+%s" % (
        name, kid, base64.b64encode(bytes([key_type]) + seed).decode())
    vkey = "%s+%s+%s" % (name, kid, base64.b64encode(bytes([key_type]) + public).decode())
    return private, skey, vkey


def read_vkey(text):
    name, kid, data = text.split("+", 2)
    raw = base64.b64decode(data, validate=True)
    assert len(kid) == 8 and raw[0] in (ED25519, COSIGNATURE) and len(raw) == 33, text
    assert key_id(name, raw[0], raw[1:]).hex() == kid, "key id of " + text
    return name, bytes.fromhex(kid), raw[0], Ed25519PublicKey.from_public_bytes(raw[1:])


def read_skey(text):
    assert text.startswith("PRIVATE+KEY+"), "private key prefix"
    name, kid, data = text[len("PRIVATE+KEY+"):].split("+", 2)
    raw = base64.b64decode(data, validate=True)
    private = Ed25519PrivateKey.from_private_bytes(raw[1:])
    assert key_id(name, raw[0], raw_public(private)).hex() == kid, "key id of private key"
    return name, raw[0], private


def split_note(text):
    for ch in text:
        assert ch == "\n" or ord(ch) >= 0x20, "control character in note"
    cut = text.rindex("\n\n")
    body, block = text[: cut + 1], text[cut + 2:]
    assert block.endswith("\n"), "signature block ends in a newline"
    sigs = []
    for line in block[:-1].split("\n"):
        assert line.startswith(EM_DASH + " "), "signature line prefix"
        name, data = line[2:].split(" ", 1)
        raw = base64.b64decode(data, validate=True)
        sigs.append((name, raw[:4], raw[4:]))
    return body, sigs


def cosigned_message(timestamp, body):
    return ("cosignature/v1\ntime %d\n" % timestamp).encode() + body.encode()


def verify_note(text, vkey):
    """True when `vkey` signed the note, False when its signature fails,
    None when it did not sign; for a cosignature, also its timestamp."""
    name, kid, key_type, public = read_vkey(vkey)
    body, sigs = split_note(text)
    for sig_name, sig_id, sig in sigs:
        if sig_name != name or sig_id != kid:
            continue
        message = body.encode()
        stamp = None
        if key_type == COSIGNATURE:
            if len(sig) != 72:
                return False, None
            stamp = int.from_bytes(sig[:8], "big")
            message = cosigned_message(stamp, body)
            sig = sig[8:]
        try:
            public.verify(sig, message)
        except InvalidSignature:
            return False, None
        return True, stamp
    return None, None


def signature_line(name, kid, signature):
    return "%s %s %s\n" % (EM_DASH, name, base64.b64encode(kid + signature).decode())


# ------------------------------------------------------- checks of the crate


def b64(data):
    return base64.b64encode(data).decode()


def unb64(text):
    return base64.b64decode(text, validate=True)


def parse_checkpoint(body):
    lines = body[:-1].split("\n")
    assert body.endswith("\n") and len(lines) >= 3 and all(lines), "checkpoint lines"
    assert lines[1] == str(int(lines[1])), "decimal size"
    root = unb64(lines[2])
    assert len(root) == 32
    return lines[0], int(lines[1]), root


def check_keys(rust, checks):
    for kind, key_type in (("signer", ED25519), ("witness", COSIGNATURE)):
        name, stype, private = read_skey(rust[kind + "_private"])
        vname, kid, vtype, public = read_vkey(rust[kind + "_verifier"])
        same = raw_public(private) == public.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        checks[kind + " key pair"] = (
            "ok" if same and name == vname and stype == vtype == key_type else "mismatch")


def check_note(rust, checks):
    ok, _ = verify_note(rust["note"], rust["signer_verifier"])
    checks["note verifies"] = "ok" if ok else "does not verify: %r" % ok
    tampered = rust["note"].replace("line", "lime", 1)
    ok, _ = verify_note(tampered, rust["signer_verifier"])
    checks["tampered note fails"] = "ok" if ok is False else "verified: %r" % ok


def check_checkpoint(rust, checks):
    text = rust["checkpoint"]
    body, _ = split_note(text)
    origin, size, root = parse_checkpoint(body)
    leaves = [leaf_hash(bytes.fromhex(d)) for d in rust["leaves"]]
    checks["checkpoint body"] = (
        "ok" if (origin, size, root) == (rust["origin"], len(leaves), mth(leaves)) else "wrong body")
    ok, _ = verify_note(text, rust["signer_verifier"])
    checks["checkpoint log signature"] = "ok" if ok else "does not verify: %r" % ok
    ok, stamp = verify_note(text, rust["witness_verifier"])
    checks["checkpoint cosignature"] = (
        "ok" if ok and stamp == rust["cosign_timestamp"] else "does not verify: %r %r" % (ok, stamp))
    forged = text.replace("\n%d\n" % size, "\n%d\n" % (size + 1), 1)
    ok, _ = verify_note(forged, rust["witness_verifier"])
    checks["changed checkpoint fails the cosignature"] = "ok" if ok is False else repr(ok)


def check_tree(rust, checks):
    leaves = [leaf_hash(bytes.fromhex(d)) for d in rust["leaves"]]
    roots = [b64(mth(leaves[:n])) for n in range(len(leaves) + 1)]
    checks["roots"] = "ok" if roots == rust["roots"] else "differ"
    bad = []
    for p in rust["inclusion"]:
        i, n, proof = p["index"], p["size"], [unb64(h) for h in p["proof"]]
        if proof != path(i, leaves[:n]) or not verify_inclusion(
                leaves[i], i, n, proof, mth(leaves[:n])):
            bad.append("inclusion %d in %d" % (i, n))
        if proof and verify_inclusion(leaves[i], i, n, proof[:-1], mth(leaves[:n])):
            bad.append("a truncated inclusion proof verified")
    for p in rust["consistency"]:
        m, n, proof = p["old"], p["new"], [unb64(h) for h in p["proof"]]
        if proof != subproof(m, leaves[:n], True) or not verify_consistency(
                m, n, mth(leaves[:m]), mth(leaves[:n]), proof):
            bad.append("consistency %d to %d" % (m, n))
    checks["proofs"] = "ok" if not bad else "; ".join(bad[:5])


# ----------------------------------------------------- made here, for the crate


def derive(seed, label):
    return hashlib.sha256(seed + label.encode()).digest()


def make(seed, timestamp):
    signer, skey, vkey = make_keys("python.example/log", ED25519, derive(seed, "log"))
    witness, wskey, wvkey = make_keys("python.example/witness", COSIGNATURE, derive(seed, "witness"))
    text = "A note from Python.\n\nIt has a blank line inside.\n"
    log_kid = key_id("python.example/log", ED25519, raw_public(signer))
    note = text + "\n" + signature_line("python.example/log", log_kid, signer.sign(text.encode()))
    leaves = [derive(seed, "leaf %d" % i) for i in range(19)]
    hashes = [leaf_hash(d) for d in leaves]
    body = "python.example/log\n%d\n%s\n" % (len(hashes), b64(mth(hashes)))
    witness_kid = key_id("python.example/witness", COSIGNATURE, raw_public(witness))
    cosignature = timestamp.to_bytes(8, "big") + witness.sign(cosigned_message(timestamp, body))
    checkpoint = (body + "\n"
                  + signature_line("python.example/log", log_kid, signer.sign(body.encode()))
                  + signature_line("python.example/witness", witness_kid, cosignature))
    n = len(hashes)
    return {
        "signer_private": skey, "signer_verifier": vkey,
        "witness_private": wskey, "witness_verifier": wvkey,
        "note": note, "note_text": text, "checkpoint": checkpoint,
        "cosign_timestamp": timestamp,
        "leaves": [d.hex() for d in leaves],
        "inclusion": [{"index": i, "size": s, "proof": [b64(h) for h in path(i, hashes[:s])]}
                      for s in range(1, n + 1) for i in range(s)],
        "consistency": [{"old": m, "new": s,
                         "proof": [b64(h) for h in subproof(m, hashes[:s], True)]}
                        for s in range(1, n + 1) for m in range(1, s + 1)],
    }


def main():
    request = json.load(sys.stdin)
    rust = request["rust"]
    checks = {}
    for check in (check_keys, check_note, check_checkpoint, check_tree):
        try:
            check(rust, checks)
        except Exception as error:  # a malformed artifact is a failed check
            checks[check.__name__] = "raised %s: %s" % (type(error).__name__, error)
    made = make(bytes.fromhex(request["seed"]), request["timestamp"])
    json.dump({"checks": checks, "made": made}, sys.stdout)


if __name__ == "__main__":
    main()
