"""Tables and target checks for benches/passthrough.sh: `python3 passthrough_report.py OUTDIR`.

Every number in the tables is the median over the rounds of that round's value. The target
checks pair the targets round by round instead ("added" = the target's percentile minus the
direct run's, or the floor's, in the same round; a throughput ratio = the target's rate over
the floor's in the same round) and judge the median of those pairs, listing each round's.
"""
import glob
import json
import os
import re
import statistics
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else "."
TARGETS = ["direct", "floor", "taproom", "taproom_id", "char", "interact", "litellm"]
LABEL = {
    "direct": "direct (fake upstream)",
    "floor": "floor (mini_proxy)",
    "taproom": "Taproom passthrough",
    "taproom_id": "Taproom passthrough, `accept-encoding: identity`",
    "char": "Taproom `char-bench`",
    "interact": "Taproom interact",
    "litellm": "LiteLLM",
}
# With CHAR_CARD the char target is that card, named after its file.
try:
    with open(os.path.join(OUT, "machine.txt")) as f:
        card = next((l.split(":", 1)[1].strip() for l in f if l.startswith("character: /")), None)
except OSError:
    card = None
if card:
    LABEL["char"] = "Taproom `char-*` (" + os.path.basename(card) + ")"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def oha(path):
    d = json.load(open(path))
    s, p = d["summary"], d["latencyPercentiles"]
    codes = d.get("statusCodeDistribution", {})
    bad = sum(v for k, v in codes.items() if k != "200")
    bad += sum(v for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k)
    ms = lambda v: None if v is None else v * 1e3
    return {"rps": s["requestsPerSec"], "p50": ms(p["p50"]), "p99": ms(p["p99"]), "errors": bad}


def streams(path):
    d = json.load(open(path))
    g = lambda k, q: (d.get(k) or {}).get(q)
    return {
        "rps": d["rps"], "errors": d["errors"], "deltas": d["deltas_per_stream"],
        "inflight": d["max_inflight"],
        "ttfd50": g("ttfd_ms", "p50"), "ttfd99": g("ttfd_ms", "p99"),
        "p50": g("total_ms", "p50"), "p99": g("total_ms", "p99"),
    }


def kit(path):
    t = open(path).read()
    num = lambda k: float(re.search(k + r"=([0-9.]+)", t).group(1)) if re.search(k + r"=([0-9.]+)", t) else None
    tot = re.search(r"total_ms p50=([0-9.]+) p99=([0-9.]+)", t)
    return {"rps": num("rps"), "errors": num("errors"),
            "p50": float(tot.group(1)) if tot else None, "p99": float(tot.group(2)) if tot else None}


def collect(prefix, case, ext, reader):
    """Per target: dict of medians over rounds."""
    res = {}
    for t in TARGETS:
        files = sorted(glob.glob(f"{OUT}/{prefix}*_{t}{case}.{ext}"))
        if not files:
            continue
        rows = [reader(f) for f in files]
        res[t] = {k: med([r[k] for r in rows]) for k in rows[0]}
        res[t]["n"] = len(rows)
    return res


def paired(prefix, case, ext, reader, t, base, key, op):
    """`op(t's value, base's value)` in each round both ran: rounds interleave the targets, so
    a pair from one round shares that round's machine state, which medians of each side alone
    do not."""
    out = []
    for path in sorted(glob.glob(f"{OUT}/{prefix}*_{base}{case}.{ext}")):
        other = path.replace(f"_{base}{case}.", f"_{t}{case}.")
        if os.path.exists(other):
            a, b = reader(other)[key], reader(path)[key]
            if a is not None and b is not None:
                out.append(op(a, b))
    return out


def rounds_text(xs, fmt):
    return "" if len(xs) < 2 else " (rounds: " + ", ".join(fmt(x) for x in xs) + ")"


def f(v, nd=2):
    return "–" if v is None else f"{v:,.{nd}f}"


def ratio(a, b):
    return None if a is None or not b else a / b


def check(ok, text):
    return f"- {'**met**' if ok else '**not met**'}: {text}"


lines = []
P = lines.append
sj = collect("r", "_seq_json", "json", oha)
rj = collect("r", "_rate_json", "json", oha)
cj = collect("r", "_c32_json", "json", oha)
ss = collect("r", "_seq_sse", "json", streams)
rs = collect("r", "_rate_sse", "json", streams)
cs = collect("r", "_c32_sse", "json", streams)
ck = collect("r", "_c32_sse_kit", "txt", kit)

if sj:
    rounds = sj["direct"]["n"]
    P(f"### Non-streaming (median of {rounds} rounds; latency ms)\n")
    P("| target | seq p50 | seq p99 | 50 QPS p50 | 50 QPS p99 | c=32 req/s | c=32 p50 | c=32 p99 | c=32 ÷ floor | c=32 ÷ direct | errors |")
    P("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in TARGETS:
        if t not in sj:
            continue
        errs = sum((d.get(t) or {}).get("errors") or 0 for d in (sj, rj, cj))
        P(f"| {LABEL[t]} | {f(sj[t]['p50'],3)} | {f(sj[t]['p99'],3)} | {f(rj[t]['p50'],3)} | {f(rj[t]['p99'],3)} "
          f"| {f(cj[t]['rps'],0)} | {f(cj[t]['p50'],3)} | {f(cj[t]['p99'],3)} "
          f"| {f(ratio(cj[t]['rps'], cj['floor']['rps']))} | {f(ratio(cj[t]['rps'], cj['direct']['rps']))} | {errs:.0f} |")
    P("")
    P("### Streaming, 20 chunks (bench_streams; TTFD = time to first delta; median of rounds; ms)\n")
    P("| target | seq TTFD p50 | seq total p50 | 50 QPS TTFD p50 | 50 QPS TTFD p99 | 50 QPS total p50 | 50 QPS total p99 | c=32 streams/s | c=32 TTFD p50 | c=32 total p50 | c=32 ÷ floor | kit sse_load c=32 streams/s | kit ÷ floor | errors |")
    P("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in TARGETS:
        if t not in ss:
            continue
        k = ck.get(t, {})
        errs = sum((d.get(t) or {}).get("errors") or 0 for d in (ss, rs, cs, ck))
        P(f"| {LABEL[t]} | {f(ss[t]['ttfd50'],3)} | {f(ss[t]['p50'],3)} | {f(rs[t]['ttfd50'],3)} | {f(rs[t]['ttfd99'],3)} "
          f"| {f(rs[t]['p50'],3)} | {f(rs[t]['p99'],3)} | {f(cs[t]['rps'],0)} | {f(cs[t]['ttfd50'],3)} | {f(cs[t]['p50'],3)} "
          f"| {f(ratio(cs[t]['rps'], cs['floor']['rps']))} | {f(k.get('rps'),0)} | {f(ratio(k.get('rps'), ck.get('floor',{}).get('rps')))} | {errs:.0f} |")
    P("")
    P("### Targets (#9, #5)\n")
    sub = lambda a, b: a - b
    div = lambda a, b: a / b
    ms3 = lambda x: f"{x:+.3f}"
    x2 = lambda x: f"{x:.2f}"
    per = paired("r", "_seq_json", "json", oha, "taproom", "floor", "p50", sub)
    d = med(per)
    P(check(d <= 0.05, f"#9 sequential JSON p50 within +0.05 ms of the floor: {d:+.3f} ms{rounds_text(per, ms3)}; medians Taproom {f(sj['taproom']['p50'],3)} vs floor {f(sj['floor']['p50'],3)} ms"))
    if "taproom_id" in sj:
        per = paired("r", "_seq_json", "json", oha, "taproom_id", "floor", "p50", sub)
        d = med(per)
        P(check(d <= 0.05, f"#9 sequential JSON p50, uncompressed (`accept-encoding: identity`): {d:+.3f} ms over the floor{rounds_text(per, ms3)}"))
    per = paired("r", "_seq_sse", "json", streams, "taproom", "floor", "p50", sub)
    d = med(per)
    P(check(d <= 0.05, f"#9 sequential streaming (total) p50 within +0.05 ms of the floor: {d:+.3f} ms{rounds_text(per, ms3)}; medians {f(ss['taproom']['p50'],3)} vs {f(ss['floor']['p50'],3)} ms"))
    per = paired("r", "_c32_json", "json", oha, "taproom", "floor", "rps", div)
    q = med(per)
    P(check(q >= 0.8, f"#9 c=32 JSON throughput ≥ 0.8× floor: median of the rounds' ratios {q:.2f}×"
          f"{rounds_text(per, x2)}; medians {f(cj['taproom']['rps'],0)} vs {f(cj['floor']['rps'],0)} req/s"))
    if "taproom_id" in cj:
        per = paired("r", "_c32_json", "json", oha, "taproom_id", "floor", "rps", div)
        q = med(per)
        P(check(q >= 0.8, f"#9 c=32 JSON throughput, uncompressed: {q:.2f}× the floor{rounds_text(per, x2)}"))
    per = paired("r", "_c32_sse", "json", streams, "taproom", "floor", "rps", div)
    kit_per = paired("r", "_c32_sse_kit", "txt", kit, "taproom", "floor", "rps", div)
    q = med(per)
    P(check(q >= 0.8, f"#9 c=32 streaming throughput ≥ 0.8× floor: median of the rounds' ratios {q:.2f}×"
          f"{rounds_text(per, x2)}; medians {f(cs['taproom']['rps'],0)} vs {f(cs['floor']['rps'],0)} streams/s"
          + (f" (kit sse_load: {med(kit_per):.2f}×{rounds_text(kit_per, x2)})" if kit_per else "")))
    if "char" in rj:
        p50s = paired("r", "_rate_json", "json", oha, "char", "direct", "p50", sub)
        p99s = paired("r", "_rate_json", "json", oha, "char", "direct", "p99", sub)
        a50, a99 = med(p50s), med(p99s)
        P(check(a50 <= 1 and a99 <= 3, f"#9 `char-*` at {50} QPS, JSON: added p50 {a50:+.3f} ms (≤ 1){rounds_text(p50s, ms3)}, "
              f"p99 {a99:+.3f} ms (≤ 3){rounds_text(p99s, ms3)}"))
        t50s = paired("r", "_rate_sse", "json", streams, "char", "direct", "ttfd50", sub)
        t99s = paired("r", "_rate_sse", "json", streams, "char", "direct", "ttfd99", sub)
        a50, a99 = med(t50s), med(t99s)
        b50 = rs["char"]["p50"] - rs["direct"]["p50"]; b99 = rs["char"]["p99"] - rs["direct"]["p99"]
        P(check(a50 <= 1 and a99 <= 3, f"#9 `char-*` at 50 QPS, streaming: added TTFD p50 {a50:+.3f} ms{rounds_text(t50s, ms3)}, "
              f"p99 {a99:+.3f} ms{rounds_text(t99s, ms3)} (total: {b50:+.3f} / {b99:+.3f} ms)"))
    if "interact" in cj:
        added = paired("r", "_c32_json", "json", oha, "interact", "direct", "p50", sub)
        a = med(added)
        P(check(a <= 2, f"#5 interact at c=32, JSON: added p50 {a:+.3f} ms (≤ 2){rounds_text(added, ms3)}: {f(cj['interact']['p50'],3)} vs direct {f(cj['direct']['p50'],3)} ms; {f(cj['interact']['rps'],0)} turns/s"))
        added = paired("r", "_c32_sse", "json", streams, "interact", "direct", "ttfd50", sub)
        a, b = med(added), cs["interact"]["p50"] - cs["direct"]["p50"]
        P(check(a <= 2, f"#5 interact at c=32, SSE: added TTFD p50 {a:+.3f} ms{rounds_text(added, ms3)}, total p50 {b:+.3f} ms; {f(cs['interact']['rps'],0)} turns/s"))
        a50 = rj["interact"]["p50"] - rj["direct"]["p50"]; a99 = rj["interact"]["p99"] - rj["direct"]["p99"]
        P(f"- (context) #5 interact at 50 QPS, JSON: added p50 {a50:+.3f} ms, p99 {a99:+.3f} ms")
    P("")

st = collect("s", "", "json", streams)
if st:
    rss = {}
    for t in TARGETS:
        rows = [json.load(open(p)) for p in sorted(glob.glob(f"{OUT}/s*_{t}_rss.json"))]
        if rows:
            rss[t] = {k: max(r[k] for r in rows) for k in rows[0]}
    P(f"### Streams at scale (median of {st['direct']['n']} rounds; memory: the largest peak, each case on a fresh Taproom; ms)\n")
    P("| target | streams/s | max in flight | deltas/stream | TTFD p50 | TTFD p99 | added TTFD p50 | added TTFD p99 | total p50 | total p99 | Taproom peak RSS (VmHWM) MB | fresh RSS MB | threads after | errors |")
    P("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    d = st["direct"]
    for t in TARGETS:
        if t not in st:
            continue
        s = st[t]
        m = rss.get(t) if t in ("taproom", "char", "interact") else None
        P(f"| {LABEL[t]} | {f(s['rps'],0)} | {f(s['inflight'],0)} | {f(s['deltas'],1)} | {f(s['ttfd50'],3)} | {f(s['ttfd99'],3)} "
          f"| {f(s['ttfd50']-d['ttfd50'],3) if t!='direct' else ''} | {f(s['ttfd99']-d['ttfd99'],3) if t!='direct' else ''} "
          f"| {f(s['p50'],1)} | {f(s['p99'],1)} | {f(m['vmhwm_kb']/1024,1) if m else ''} | {f(m['rss_before_kb']/1024,1) if m else ''} | {f(m['threads'],0) if m else ''} | {s['errors']:.0f} |")
    P("")
    P("### Targets (#6)\n")
    for t in ("taproom", "char", "interact"):
        if t not in st:
            continue
        s, m = st[t], rss.get(t)
        P(check(m["vmhwm_kb"] / 1024 <= 150, f"#6 {LABEL[t]}: peak RSS {m['vmhwm_kb']/1024:.1f} MB (≤ 150)"))
        a50, a99 = s["ttfd50"] - d["ttfd50"], s["ttfd99"] - d["ttfd99"]
        P(check(a99 <= 5, f"#6 {LABEL[t]}: added TTFD p50 {a50:+.3f} ms, p99 {a99:+.3f} ms (p99 ≤ 5)"))
cpu = {}
retried = 0
if os.path.exists(f"{OUT}/cpu.tsv"):
    for l in open(f"{OUT}/cpu.tsv"):
        c = l.rstrip("\n").split("\t")
        retried += len(c) > 4 and c[4] != "1"
        cpu[c[0]] = c  # the attempt that was kept is the last one
if cpu:
    other = [max(0.0, float(c[3])) for c in cpu.values()]
    busy = [c for c in cpu.values() if float(c[3]) > 0.25]
    P("")
    P(f"CPU used by other processes during the kept measurements (cores; approximate, from "
      f"/proc/stat minus this run's processes): median {statistics.median(other):.2f}, max {max(other):.2f}; "
      f"{retried} case(s) measured again because of other load; {len(busy)} of {len(cpu)} kept cases above 0.25"
      + (": " + ", ".join(f"{c[0]} ({float(c[3]):.2f})" for c in busy[:12]) if busy else "") + ".")
print("\n".join(lines))
