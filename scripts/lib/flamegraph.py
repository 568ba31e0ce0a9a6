#!/usr/bin/env python3
"""A flame graph (SVG) and the functions that take the time, from `perf script` output.
Standard library only; Rust's legacy symbol mangling is undone here.

    perf record -F 499 --call-graph dwarf,16384 -o perf.data -- target/release/fmsflow run ...
    perf script -i perf.data | python3 scripts/lib/flamegraph.py --title "replay" --out flame.svg

Prints the functions with the most samples of their own ("self") and, with --total, those
with the most samples under them; writes the collapsed stacks beside the SVG (.folded).
"""

import argparse
import collections
import re
import sys
from xml.sax.saxutils import escape

FRAME = re.compile(r"^\s*[0-9a-f]+\s+(.+?)\s+\(([^()]*)\)\s*$")
OFFSET = re.compile(r"\+0x[0-9a-f]+$")
HASH = re.compile(r"::h[0-9a-f]{16}$")
ESCAPES = {"$LT$": "<", "$GT$": ">", "$u20$": " ", "$u27$": "'", "$u5b$": "[", "$u5d$": "]",
           "$u7b$": "{", "$u7d$": "}", "$u7e$": "~", "$RF$": "&", "$BP$": "*", "$C$": ",",
           "$SP$": "@", "$u3b$": ";", "$u22$": '"', "$u2b$": "+"}


def demangle(sym):
    """`_ZN3foo3bar17h0123456789abcdefE` -> `foo::bar`; anything else is returned as it is
    (without a trailing hash)."""
    if sym.startswith("_ZN") and sym.endswith("E"):
        body, parts, i = sym[3:-1], [], 0
        while i < len(body) and body[i].isdigit():
            j = i
            while j < len(body) and body[j].isdigit():
                j += 1
            n = int(body[i:j])
            parts.append(body[j:j + n])
            i = j + n
        if parts and re.fullmatch(r"h[0-9a-f]{16}", parts[-1]):
            parts.pop()
        name = "::".join(parts)
        for k, v in ESCAPES.items():
            name = name.replace(k, v)
        name = name.replace("..", "::").replace("_$", "$")
        return name
    return HASH.sub("", sym)


def stacks(lines):
    """(comm, [frames root first]) of each sample of `perf script`."""
    comm, frames = None, []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if comm is not None:
                yield comm, frames[::-1]
            comm, frames = None, []
        elif not line[0].isspace():
            comm, frames = line.split()[0], []
        else:
            m = FRAME.match(line)
            if m:
                sym = OFFSET.sub("", m.group(1))
                if sym == "[unknown]":
                    dso = m.group(2).rsplit("/", 1)[-1]
                    sym = f"[{dso}]"
                frames.append(demangle(sym))
    if comm is not None:
        yield comm, frames[::-1]


def short(name, width=100):
    return name if len(name) <= width else name[:width - 1] + "…"


def svg(folded, out, title, min_share=0.002):
    total = sum(folded.values())
    tree = {}
    for stack, n in folded.items():
        node = tree
        for f in stack:
            node = node.setdefault(f, {"_n": 0, "_c": {}})
            node["_n"] += n
            node = node["_c"]
    depth = max((len(s) for s in folded), default=0)
    W, row = 1200, 16
    H = (depth + 3) * row + 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="monospace" font-size="11">',
             f'<rect width="{W}" height="{H}" fill="#fdfdf6"/>',
             f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="15">{escape(title)}</text>',
             f'<text x="{W / 2}" y="36" text-anchor="middle" fill="#555">{total:,} samples; '
             f'width = share of samples; root at the bottom; hover for names</text>']

    def colour(name):
        h = sum(map(ord, name)) % 60
        return f"hsl({10 + h},85%,{55 + h % 15}%)"

    def draw(children, x, level):
        for name, node in sorted(children.items(), key=lambda kv: -kv[1]["_n"]):
            w = node["_n"] / total * (W - 20)
            if node["_n"] / total >= min_share:
                y = H - (level + 2) * row
                pct = 100 * node["_n"] / total
                label = escape(short(name, max(0, int(w / 6.6) - 1))) if w > 30 else ""
                parts.append(f'<g><title>{escape(name)} ({node["_n"]:,} samples, {pct:.1f} %)</title>'
                             f'<rect x="{x:.1f}" y="{y}" width="{max(w - 0.5, 0.5):.1f}" height="{row - 1}" '
                             f'fill="{colour(name)}"/>'
                             f'<text x="{x + 3:.1f}" y="{y + row - 4}">{label}</text></g>')
                draw(node["_c"], x, level + 1)
            x += w
    draw(tree, 10, 0)
    parts.append("</svg>")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the SVG to write")
    p.add_argument("--title", default="flame graph")
    p.add_argument("--top", type=int, default=25, help="functions to list (default 25)")
    p.add_argument("--total", action="store_true", help="also list the functions with the most samples under them")
    p.add_argument("input", nargs="?", help="perf script output (default: stdin)")
    a = p.parse_args(argv)
    src = open(a.input, encoding="utf-8", errors="replace") if a.input else sys.stdin
    folded = collections.Counter()
    for comm, frames in stacks(src):
        folded[tuple([comm] + frames)] += 1
    if not folded:
        sys.exit("no samples with stacks in the input (perf record --call-graph dwarf?)")
    total = sum(folded.values())
    with open(a.out.rsplit(".", 1)[0] + ".folded", "w", encoding="utf-8") as f:
        for stack, n in sorted(folded.items(), key=lambda kv: -kv[1]):
            f.write(";".join(s.replace(";", ",") for s in stack) + f" {n}\n")
    svg(folded, a.out, a.title)
    own, under = collections.Counter(), collections.Counter()
    for stack, n in folded.items():
        own[stack[-1]] += n
        for f in set(stack[1:]):
            under[f] += n
    print(f"{total:,} samples; self:")
    for name, n in own.most_common(a.top):
        print(f"  {100 * n / total:5.1f} %  {short(name, 140)}")
    if a.total:
        print("total (self and under):")
        for name, n in under.most_common(a.top):
            print(f"  {100 * n / total:5.1f} %  {short(name, 140)}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
