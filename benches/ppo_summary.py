"""Summaries for benches/ppo_bench.sh (standard library only).

  ppo_summary.py align METRICS.jsonl TIME_V_FILE REP SKIP   -> one JSON line for an align run
  ppo_summary.py trl   TRL_OUTPUT      TIME_V_FILE REP SKIP   -> one JSON line for a TRL run
  ppo_summary.py table RUNS.jsonl                            -> the per-run lines and the medians

A run's figures are per-iteration means over the iterations after the first SKIP (warm-up):
each time part in seconds, generation share = Σ generation / Σ iteration, rollout tokens/s =
Σ response tokens / Σ generation seconds. Peak RSS comes from `/usr/bin/time -v`."""
import json, statistics, sys

PARTS = ["generation", "scoring", "forward", "optimisation", "iteration"]


def peak_rss_mib(path):
    for line in open(path, encoding="utf-8", errors="replace"):
        if "Maximum resident set size" in line:
            return int(line.split()[-1]) / 1024
    return float("nan")


def summarise(engine, its, rss, rep):
    if not its:
        sys.exit(f"{engine}: no timed iterations")
    n = len(its)
    row = {"engine": engine, "rep": rep, "timed_iterations": n, "peak_rss_mib": rss}
    for p in PARTS:
        row[p] = sum(i[p] for i in its) / n
    gen = sum(i["generation"] for i in its)
    row["generation_share"] = gen / sum(i["iteration"] for i in its)
    row["rollout_tokens_per_second"] = sum(i["tokens"] for i in its) / gen
    row["response_tokens"] = sum(i["tokens"] for i in its) / n
    if all("decoded" in i for i in its):
        row["decoded_positions"] = sum(i["decoded"] for i in its) / n
    return row


def align_run(metrics, timefile, rep, skip):
    its = []
    for line in open(metrics, encoding="utf-8"):
        m = json.loads(line)
        if "time/iteration" not in m:
            continue
        it = {p: m[f"time/{p}"] for p in PARTS}
        it["tokens"] = m["rollout_tokens_per_second"] * m["time/generation"]
        its.append(it)
    return summarise("align", its[skip:], peak_rss_mib(timefile), rep)


def trl_run(output, timefile, rep, skip):
    # the trainer prints its own log lines first; our JSON is the last line
    last = [l for l in open(output, encoding="utf-8") if l.strip()][-1]
    return summarise("trl", json.loads(last)["iterations"][skip:], peak_rss_mib(timefile), rep)


def table(path):
    runs = [json.loads(l) for l in open(path, encoding="utf-8") if l.strip()]
    head = f"{'engine':<6} {'rep':>3} | " + " ".join(f"{p[:5]:>7}" for p in PARTS) + " | share  tok/s   decoded  MiB"
    print("per run (seconds per iteration, means over the timed iterations):")
    print(head)
    for r in runs:
        parts = " ".join(f"{r[p]:7.2f}" for p in PARTS)
        dec = f"{r['decoded_positions']:7.1f}" if "decoded_positions" in r else f"{r['response_tokens']:7.1f}"
        print(f"{r['engine']:<6} {r['rep']:>3} | {parts} | {r['generation_share']:5.1%} {r['rollout_tokens_per_second']:6.1f} {dec} {r['peak_rss_mib']:5.0f}")
    engines = [e for e in ("align", "trl") if any(r["engine"] == e for r in runs)]
    med = {e: {} for e in engines}
    keys = PARTS + ["generation_share", "rollout_tokens_per_second", "response_tokens", "peak_rss_mib"]
    for e in engines:
        rs = [r for r in runs if r["engine"] == e]
        for k in keys:
            med[e][k] = statistics.median(r[k] for r in rs)
    print(f"\nmedians over {len([r for r in runs if r['engine'] == engines[0]])} runs per engine:")
    print(f"{'':<26} " + " ".join(f"{e:>10}" for e in engines) + ("   align/TRL" if len(engines) == 2 else ""))
    labels = {f: f"time/{f} (s)" for f in PARTS}
    labels.update(generation_share="generation share", rollout_tokens_per_second="rollout tokens/s",
                  response_tokens="response tokens/iteration", peak_rss_mib="peak RSS (MiB)")
    for k in keys:
        vals = [med[e][k] for e in engines]
        cells = " ".join(f"{v:10.1%}" if k == "generation_share" else f"{v:10.2f}" for v in vals)
        ratio = f"   {vals[0] / vals[1]:8.2f}x" if len(vals) == 2 and vals[1] else ""
        print(f"{labels[k]:<26} {cells}{ratio}")
    print("time: lower is better (align/TRL < 1 = align faster); tokens/s: higher is better")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "table":
        table(sys.argv[2])
    else:
        rep, skip = int(sys.argv[4]), int(sys.argv[5])
        fn = align_run if cmd == "align" else trl_run
        print(json.dumps(fn(sys.argv[2], sys.argv[3], rep, skip)))
