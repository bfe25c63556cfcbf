#!/usr/bin/env python3
"""Writes the seed corpus of fuzz/fuzz_core.cpp into fuzz/seeds/ (committed).

Layout of an input: flags, eps byte (or 0xff + 8-byte eps), rows byte, values
(see fuzz_core.cpp). Seeds cover every op/reg/direction/dtype/mode with ties,
constant rows, NaN/inf, denormals, 1e300 magnitudes, lengths across the sort
paths' thresholds (160/161 counting ranks vs radix), and eps from 0 to 1e300.
"""
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "seeds")

# Indices into kEpsTable of fuzz_core.cpp.
EPS = {"0": 0, "denorm": 1, "1e-320": 2, "dblmin": 3, "1e-300": 4, "1e-12": 6, "1e-3": 8,
       "0.1": 10, "1": 12, "10": 14, "1e6": 16, "1e100": 18, "1e300": 19, "dblmax": 20,
       "inf": 21, "0.3": 23}


def flags(op, reg, desc, f32, mode, enc):
    return op | reg << 1 | desc << 2 | f32 << 3 | mode << 4 | enc << 6


def raw_doubles(vals):
    return b"".join(struct.pack("<d", v) for v in vals)


def raw_floats(vals):
    import numpy as np  # float32 rounding (overflow to inf) without struct's range check

    return np.asarray(vals, dtype=np.float64).astype(np.float32).tobytes()


def main():
    os.makedirs(OUT, exist_ok=True)
    for name in os.listdir(OUT):
        if not name.startswith("regression_"):  # inputs that once failed stay
            os.remove(os.path.join(OUT, name))
    rows = {
        "ties": [3.0, 1.0, 3.0, 2.0, 1.0, 3.0, 0.0, 2.0],
        "constant": [0.75] * 9,
        "nan": [1.0, float("nan"), 2.0, 0.5],
        "inf": [1.0, float("inf"), -2.0],
        "neginf": [float("-inf"), 0.0],
        "denormals": [5e-324, -5e-324, 0.0, 1e-323, 5e-324, -0.0, 2.2e-308],
        "huge": [1e300, -1e300, 3e299, 0.0, -1e300, 1e300],
        "dblmax": [1.7976931348623157e308, -1.7976931348623157e308, 0.0, 1.0],
        "mixed": [1e300, 1e-300, -5e-324, 0.0, 1.0, -1e10, 1e-10],
        "signed_zeros": [0.0, -0.0, 0.0, -0.0],
        "one": [42.0],
    }
    count = 0

    def write(tag, data):
        nonlocal count
        with open(os.path.join(OUT, f"{count:03d}_{tag}"), "wb") as f:
            f.write(data)
        count += 1

    for rname, vals in rows.items():
        for op in (0, 1):
            for reg in (0, 1):
                for eps in ("0", "1e-300", "1", "1e300", "inf", "denorm"):
                    desc = (op + reg) % 2
                    write(f"{rname}_op{op}_reg{reg}_eps{eps}",
                          bytes([flags(op, reg, desc, 0, 0, 0), EPS[eps], 0]) + raw_doubles(vals))
        # float32, two rows, and isotonic (plain and weighted)
        write(f"{rname}_f32", bytes([flags(0, 1, 0, 1, 0, 3), EPS["0.1"], 0]) + raw_floats(vals))
        write(f"{rname}_rows2", bytes([flags(1, 0, 1, 0, 0, 0), EPS["1"], 1]) + raw_doubles(vals + vals[::-1]))
        # the projection onto the permutahedron (mode 3), l2 and kl, two rows
        write(f"{rname}_proj", bytes([flags(0, 0, 0, 0, 3, 0), EPS["1"], 1]) + raw_doubles(vals + vals[::-1]))
        write(f"{rname}_projkl", bytes([flags(0, 1, 0, 0, 3, 0), EPS["0.3"], 1]) + raw_doubles(vals[::-1] + vals))
        write(f"{rname}_iso", bytes([flags(0, 0, 0, 0, 1, 0), 0, 0]) + raw_doubles(vals))
        write(f"{rname}_isow", bytes([flags(0, 0, 1, 0, 2, 0), 0, 0]) + raw_doubles(vals))
    # Raw eps values from 0 to 1e300 (eps byte 0xff + the double).
    for eps in (0.0, 5e-324, 1e-310, 1e-300, 1e-150, 1e-8, 0.25, 3.0, 1e8, 1e150, 1e300, 1.7e308):
        for op in (0, 1):
            write(f"rawEps{eps:g}_op{op}",
                  bytes([flags(op, op, 0, 0, 0, 0), 0xFF]) + struct.pack("<d", eps) + b"\x00"
                  + raw_doubles(rows["mixed"] + rows["ties"]))
    # Byte-encoded rows across the sort thresholds (many ties, special values).
    for n in (150, 160, 161, 170, 300, 2000):
        for enc in (1, 2):
            body = bytes((i * 37 + 11) % 64 for i in range(n))
            write(f"len{n}_enc{enc}", bytes([flags(n % 2, 0, 0, n % 3 == 0, 0, enc), EPS["0.3"], 0]) + body)
    print(f"{count} seeds in {OUT}")


if __name__ == "__main__":
    sys.exit(main())
