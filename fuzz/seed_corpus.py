#!/usr/bin/env python3
"""Writes small seed inputs for the fuzz targets into fuzz/corpus/{png_card,charx}.

Each card text chunk of the SillyTavern fixtures is embedded in the tiny built-in avatar (so
seeds stay small and libFuzzer's max_len does not cut them), and wrapped in a CharX zip.
Run from the repository root: python3 fuzz/seed_corpus.py
"""
import base64, io, os, struct, zipfile, zlib

def chunks(b):
    p, out = 8, []
    while p < len(b):
        (l,) = struct.unpack(">I", b[p:p + 4])
        t, d = b[p + 4:p + 8], b[p + 8:p + 8 + l]
        out.append((t, d))
        p += 12 + l
        if t == b"IEND":
            break
    return out

def chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

base = open("src/cards/default_avatar.png", "rb").read()
os.makedirs("fuzz/corpus/png_card", exist_ok=True)
os.makedirs("fuzz/corpus/charx", exist_ok=True)
n = 0
for f in ["default_Seraphina.png", "default_FluxTheCat.png", "v1_Aqua.png", "st_export_Aqua_v2_v3.png"]:
    for t, d in chunks(open("tests/fixtures/" + f, "rb").read()):
        if t != b"tEXt":
            continue
        png = b"\x89PNG\r\n\x1a\n"
        for bt, bd in chunks(base):
            if bt == b"IEND":
                png += chunk(t, d)
            png += chunk(bt, bd)
        open(f"fuzz/corpus/png_card/seed{n}.png", "wb").write(png)
        z = io.BytesIO()
        with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("card.json", base64.b64decode(d.split(b"\0", 1)[1]))
            zf.writestr("assets/icon/images/main.png", base)
        open(f"fuzz/corpus/charx/seed{n}.charx", "wb").write(z.getvalue())
        n += 1
print(f"wrote {n} seeds per target")
